"""Palu: KV-Cache Compression with Low-Rank Projection (Chang et al., ICLR 2025).

The key and value projections of every layer are decomposed, per group of ``group`` KV heads, by a truncated SVD,
W ≈ B A with A = Σ^½ Vᵀ and B = U Σ^½ (rank r = ``ratio`` of the group's dimensions, rounded to a multiple of
``align``): the cache holds the latent h = A x of each token (r numbers per group instead of the group's keys or
values), and attention reads B h (+ the bias), keys turned by RoPE after they are rebuilt. The latent follows from the
projection's output k = W x + b as h = Σ^-½ Uᵀ (k − b), which is how the cache computes it (pre-RoPE keys: it turns
them back first). Palu's low-rank-aware quantisation (``bits`` < 16): the latent is rotated by an orthonormal Hadamard
matrix (folded into A and B) and quantised per token over each group's latent, asymmetric with an integer zero point,
as the authors' quantiser (shadowpa0327/Palu at bb22666, ``quant_utils``).

The decomposition is the authors' ``--decompose_method svd`` (plain SVD) or, with ``calibration`` token ids,
``whiten``: the SVD of W S where S is the Cholesky factor of the calibration inputs' Gram matrix Σ xxᵀ (from SVD-LLM),
which minimises the reconstruction error of the calibration keys and values rather than of the weights. Ranks are
``--search_method uniform`` (the same for every group) or, with ``search="fisher"``, their ``fisher`` search: each
group's share of the total rank is its share of the Fisher information (the root mean squared gradient of the
language-model loss with respect to the k/v projection weights, one calibration sequence per backward pass, averaged
over the group's weights), over every layer's key and value groups at once, floored and capped at the group's
dimensions, the remainder handed out one rank at a time to the groups with the smallest fractional parts (the
authors' order), then rounded to a multiple of ``align``. Their accuracy path
compresses every key and value before its own attention, the prompt's included; here the prompt pass attends to its
exact keys and values (as KIVI and GEAR), and each token's own attention sees itself exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch

from graphprune.errors import RecipeError, ScheduleError
from graphprune.kv.calibration import calibrate, calibration_ids, weight_fisher
from graphprune.kv.policy import CachePolicy, Chunk, Codec, When
from graphprune.ops.hadamard import hadamard
from graphprune.ops.quant import dequantize_zero_point, quantize_zero_point
from graphprune.ops.rope import rotate
from graphprune.recipes.base import option, register


@dataclass(frozen=True)
class Projection:
    """One layer's keys or values in Palu's form, per group of heads: latent = (x − bias) · encode, x ≈ latent ·
    decode + bias; ``encode`` (G, s·D, r), ``decode`` (G, r, s·D), ``bias`` (G, s·D) or None."""

    encode: torch.Tensor
    decode: torch.Tensor
    bias: torch.Tensor | None


def projection(weight: torch.Tensor, bias: torch.Tensor | None, groups: int, rank: int, rotate_latent: bool,
               outputs: torch.Tensor | None = None) -> Projection:
    """Palu's decomposition of one projection ``weight`` (G·s·D, C), per group of rows: plain SVD, or with
    ``outputs`` (the projection's outputs on calibration text, (..., G·s·D)) the whitened SVD of W S, S Sᵀ = Σ xxᵀ
    over the calibration inputs. Only W S's left singular vectors and values enter the codec, and
    W S (W S)ᵀ = Σ (Wx)(Wx)ᵀ: they are the eigenvectors and root eigenvalues of the outputs' Gram matrix (bias
    removed), so neither the inputs nor S are needed."""
    if outputs is None:
        w = weight.detach().double().reshape(groups, -1, weight.shape[-1])
        u, sigma, _ = torch.linalg.svd(w, full_matrices=False)
    else:
        y = outputs.detach().double().reshape(-1, outputs.shape[-1])
        if bias is not None:
            y = y - bias.detach().double()
        y = y.reshape(y.shape[0], groups, -1).transpose(0, 1)  # (G, tokens, s·D)
        power, u = torch.linalg.eigh(y.transpose(1, 2) @ y)
        u, sigma = u.flip(-1), power.flip(-1).clamp_min(0).sqrt()
    u, root = u[..., :rank], sigma[..., :rank].sqrt().clamp_min(1e-30)
    encode, decode = u / root[:, None, :], (u * root[:, None, :]).transpose(1, 2)
    if rotate_latent:
        m = hadamard(rank).to(encode.device)
        encode, decode = encode @ m, m.T @ decode
    return Projection(encode.float(), decode.float(), None if bias is None else bias.detach().float().reshape(groups, -1))


def projections(weight: torch.Tensor, bias: torch.Tensor | None, ranks: list[int], rotate_latent: bool,
                outputs: torch.Tensor | None = None) -> tuple[Projection, ...]:
    """One projection for all groups where their ranks agree, else one per group (its rows of the weight)."""
    groups = len(ranks)
    if len(set(ranks)) == 1:
        return (projection(weight, bias, groups, ranks[0], rotate_latent, outputs),)
    rows = weight.shape[0] // groups
    part = lambda t, g: None if t is None else t[..., g * rows:(g + 1) * rows]  # noqa: E731
    return tuple(projection(weight[g * rows:(g + 1) * rows], part(bias, g), 1, r, rotate_latent, part(outputs, g))
                 for g, r in enumerate(ranks))


def fisher_ranks(fisher: list[tuple[torch.Tensor, torch.Tensor]], groups: int, dims: int, ratio: float,
                 align: int) -> list[tuple[list[int], list[int]]]:
    """Palu's Fisher rank search (the authors' ``rank_search``, ``fisher``): per layer, the key and the value groups'
    ranks, from each projection weight's Fisher information ``fisher`` (per layer: keys' and values' (out, in))."""
    means = [[float(f.reshape(groups, -1).mean(-1)[g]) for g in range(groups)] for pair in fisher for f in pair]
    target = len(means) * groups * dims * ratio
    total = sum(map(sum, means))
    share = [[target * m / total for m in module] for module in means]
    ranks = [[min(dims, math.floor(x)) for x in module] for module in share]
    order = sorted(((i, g) for i in range(len(means)) for g in range(groups)),
                   key=lambda ig: share[ig[0]][ig[1]] - ranks[ig[0]][ig[1]])
    left = target - sum(map(sum, ranks))
    while left > 0:  # one rank at a time, smallest fractional parts first (the authors' loop, overshoot included)
        for i, g in order:
            if ranks[i][g] == dims:
                continue
            ranks[i][g] += 1
            left -= 1
            if left == 0:
                break
    ranks = [[min(dims, max(1, round(r / align)) * align) for r in module] for module in ranks]
    return [(ranks[2 * i], ranks[2 * i + 1]) for i in range(len(fisher))]


def _rebuild(*parts, pos, projs: tuple[Projection, ...], bits: int, heads: int, inv_freq: torch.Tensor | None, dtype):
    per = 3 if bits < 16 else 1  # (codes, scale, zero point) or the latent
    xs = []
    for j, proj in enumerate(projs):
        own = parts[j * per:(j + 1) * per]
        h = dequantize_zero_point(*own, bits) if bits < 16 else own[0].float()
        x = torch.einsum("bgnr,grk->bgnk", h, proj.decode.to(h.device))
        if proj.bias is not None:
            x = x + proj.bias.to(x.device)[None, :, None, :]
        xs.append(x)
    x = torch.cat(xs, 1)
    b, g, n, _ = x.shape
    x = x.reshape(b, g, n, heads // g, -1).permute(0, 1, 3, 2, 4).reshape(b, heads, n, -1)
    if inv_freq is not None:  # keys: RoPE at their own positions
        x = rotate(x, pos[..., :n], inv_freq)
    return x.to(dtype)


@dataclass(frozen=True)
class PaluCodec(Codec):
    keys: tuple[Projection, ...]  # consecutive groups of KV heads, each projection one rank
    values: tuple[Projection, ...]
    inv_freq: torch.Tensor
    bits: int

    def join(self, last, new):  # every token is compressed as it comes: one growing chunk
        return Chunk(tuple(torch.cat([a, b], 2) for a, b in zip(last.parts, new.parts)), new.rebuild)

    def due(self, held, keys):
        return held

    def encode(self, x, valid, pos, keys, prompt):
        projs = self.keys if keys else self.values
        if keys:  # back to the projection's output
            x = rotate(x, -pos, self.inv_freq)
        b, heads, n, d = x.shape
        g = sum(p.encode.shape[0] for p in projs)
        xg = x.float().reshape(b, g, heads // g, n, d).permute(0, 1, 3, 2, 4).reshape(b, g, n, -1)
        parts, first = [], 0
        for proj in projs:
            own = xg[:, first:first + proj.encode.shape[0]]
            first += proj.encode.shape[0]
            if proj.bias is not None:
                own = own - proj.bias.to(own.device)[None, :, None, :]
            h = torch.einsum("bgnk,gkr->bgnr", own, proj.encode.to(own.device))
            parts += quantize_zero_point(h, self.bits) if self.bits < 16 else (h.to(x.dtype),)
        rebuild = partial(_rebuild, projs=projs, bits=self.bits, heads=heads,
                          inv_freq=self.inv_freq if keys else None, dtype=x.dtype)
        return Chunk(tuple(parts), rebuild)


def _projections(attn, info):
    """The key and value projections' weights and biases of one attention module (fused q/k/v sliced: Phi-3)."""
    if hasattr(attn, "qkv_proj"):
        w, bias = attn.qkv_proj.weight, attn.qkv_proj.bias
        return tuple((w[cols], None if bias is None else bias[cols]) for cols in info.fused_kv())
    return (attn.k_proj.weight, attn.k_proj.bias), (attn.v_proj.weight, attn.v_proj.bias)


@register
@dataclass
class Palu(CachePolicy):
    name = "palu"
    summary = "cache a low-rank latent of each group of heads' keys and values (SVD of the k/v projections), " \
              "optionally quantised after a Hadamard rotation; rebuild them for attention"
    paper = "Palu: KV-Cache Compression with Low-Rank Projection (ICLR 2025)"
    zero = {"ratio": 1.0}
    evicts = When.NEVER
    exportable = False  # the latent chunks grow as tokens come
    sizes_itself = "projects every token to its latent and keeps every token"

    budget: float = option(1.0, "Palu keeps every token: the budget stays 1.0 (the full cache)")
    ratio: float = option(0.5, "share of each group's key and value dimensions the latent keeps (1.0: the model)")
    group: int = option(4, "KV heads per decomposition group (1: per head, M-LRD; all of them: joint, J-LRD)")
    align: int = option(32, "ranks are rounded to a multiple of this (as the authors' rank allocation)")
    bits: int = option(16, "quantise the latent to 2, 3 or 4 bits (per token, after a Hadamard rotation); 16: not")
    calibration: object = option(None, "token ids (N, T) to whiten the SVD with (Palu's `whiten`); None: plain SVD")
    search: str = option("uniform", "rank allocation: 'uniform' (every group `ratio` of its dimensions) or 'fisher' "
                                    "(Palu's search: groups ranked by the Fisher information of calibration text)")

    def validate(self) -> None:
        super().validate()
        if not 0 < self.ratio <= 1:
            raise ScheduleError(f"ratio must lie in (0, 1], got {self.ratio}")
        if self.bits not in (2, 3, 4, 8, 16):
            raise ScheduleError(f"bits must be 2, 3, 4, 8 or 16 (no quantisation), got {self.bits}")
        if self.group < 1 or self.align < 1:
            raise ScheduleError("group and align must be ≥ 1")
        if self.search not in ("uniform", "fisher"):
            raise ScheduleError(f"search must be 'uniform' or 'fisher', got {self.search!r}")

    def rank(self, dims: int) -> int:
        """The latent size of a group of ``dims`` key (or value) dimensions."""
        return min(dims, max(1, round(self.ratio * dims / self.align)) * self.align)

    def layer_codecs(self, model, info):
        if self.ratio == 1.0 and self.bits == 16:
            return (None,) * info.n_layers  # the full cache
        if info.mrope or None in info.inv_freq:
            raise RecipeError("palu rebuilds keys and turns them by RoPE; this model's positions are not one row of "
                              "rotary positions graphprune can read (multimodal RoPE): use another cache recipe")
        group = min(self.group, info.kv_heads)
        if info.kv_heads % group:
            raise RecipeError(f"group={self.group} does not divide the {info.kv_heads} KV heads: give a divisor")
        dims, groups = group * info.head_dim, info.kv_heads // group
        layers = model.get_decoder().layers
        if any(hasattr(layer.self_attn, "k_norm") for layer in layers):
            raise RecipeError(f"palu decomposes the key projection, but {info.family} normalises keys after it "
                              "(k_norm): the keys are not a linear map of the input; use another cache recipe")
        if self.search == "fisher" and self.calibration is None:
            raise RecipeError("palu's Fisher rank search ranks the groups by the Fisher information of calibration "
                              "text: pass calibration=token ids (N, T), e.g. tokenizer(texts).input_ids")
        outputs = [(None, None)] * len(layers)
        ranks = [([self.rank(dims)] * groups, [self.rank(dims)] * groups)] * len(layers)
        if self.calibration is not None:
            ids = calibration_ids(model, self.calibration)
            if self.search == "fisher":  # (the same passes give the outputs that whiten the SVD)
                fisher, outputs = weight_fisher(model, ids, info)
                ranks = fisher_ranks(fisher, groups, dims, self.ratio, self.align)
            largest = max(r for pair in ranks for side in pair for r in side)
            if ids.numel() < largest:
                raise RecipeError(f"palu whitens a latent of {largest} dimensions with the calibration text's "
                                  f"statistics, but calibration holds {ids.numel()} tokens: give at least {largest}, "
                                  "better thousands")
            if self.search == "uniform":
                outputs = calibrate(model, ids, info, fisher=False)[0]
        if self.bits < 16:
            for rank in sorted({r for pair in ranks for side in pair for r in side}):
                self._check_quantisable(rank, dims)
        codecs = []
        for i, layer in enumerate(layers):
            (wk, bk), (wv, bv) = _projections(layer.self_attn, info)
            (key_ranks, value_ranks), (keys, values) = ranks[i], outputs[i]
            codecs.append(PaluCodec(projections(wk, bk, key_ranks, self.bits < 16, keys),
                                    projections(wv, bv, value_ranks, self.bits < 16, values), info.inv_freq[i],
                                    self.bits))
        return tuple(codecs)

    def _check_quantisable(self, rank: int, dims: int) -> None:
        try:
            hadamard(rank)
        except ValueError:
            raise RecipeError(f"palu: a latent of {rank} dimensions has no Hadamard rotation here; choose another "
                              "ratio or align (ranks that are multiples of 32 up to 512, but 416, have one)") from None
        if rank % 8:
            raise RecipeError(f"palu: quantised latents are packed 8 codes at a time: rank {rank} (of a group's {dims} "
                              f"dimensions, rounded to a multiple of align) must be a multiple of 8")
