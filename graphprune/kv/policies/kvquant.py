"""KVQuant: Towards 10 Million Context Length LLM Inference with KV Cache Quantization (Hooper et al., NeurIPS 2024).

Keys are quantised per channel before RoPE (the cache turns them back, and turns the rebuilt ones again), values per
token over all KV heads' entries, both to a non-uniform datatype: one codebook of 2^``bits`` levels per layer for keys
and one for values, fitted by k-means on calibration activations normalised to [−1, 1], weighted by their Fisher
information (the squared gradient of the language-model loss with respect to the k/v projection's output). Dense and
sparse: the ``outliers`` share of each vector (half at each tail) is kept exactly; keys by per-channel bounds calibrated
as percentiles, values by each token's own quantiles (its scale from the largest and smallest entry that is not an
outlier). As the authors' code (SqueezeAILab/KVQuant at 57a2383, ``simquant_module_quantizer``), with these
differences: the k-means is a weighted Lloyd iteration (``iterations``) from the weighted quantiles, not scikit-learn's
k-means++ start; the prompt pass attends to its exact keys and values (their perplexity protocol quantises before the
prompt's own attention); attention-sink-aware quantisation (the first tokens in full precision, off in their
reproduction commands) is not implemented. Calibration: ``calibration`` token ids (the authors use 16 × 2048 tokens of WikiText-2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch

from graphprune.errors import RecipeError, ScheduleError
from graphprune.kv.calibration import calibrate
from graphprune.kv.policy import CachePolicy, Chunk, Codec, When
from graphprune.ops.quant import pack, unpack
from graphprune.ops.rope import rotate
from graphprune.recipes.base import option, register


def percentile(x: torch.Tensor, q: float, dim: int) -> torch.Tensor:
    """The ``q`` quantile (in [0, 1]) along ``dim`` with linear interpolation (numpy's default), keeping the dim."""
    s = x.sort(dim).values
    pos = q * (x.shape[dim] - 1)
    lo, frac = math.floor(pos), pos - math.floor(pos)
    hi = min(lo + 1, x.shape[dim] - 1)
    return s.narrow(dim, lo, 1) * (1 - frac) + s.narrow(dim, hi, 1) * frac


def weighted_kmeans(x: torch.Tensor, w: torch.Tensor, k: int, iterations: int) -> torch.Tensor:
    """1-D k-means of the points ``x`` weighted by ``w`` (Lloyd's iteration from the weighted quantiles), sorted
    centroids (k,)."""
    order = x.argsort()
    x, w = x[order].double(), w[order].double() + 1e-30
    cum = w.cumsum(0) / w.sum()
    centroids = x[torch.searchsorted(cum, (torch.arange(k, dtype=torch.float64, device=x.device) + 0.5) / k).clamp(max=len(x) - 1)]
    for _ in range(iterations):
        centroids = centroids.sort().values
        cluster = torch.bucketize(x, (centroids[1:] + centroids[:-1]) / 2)
        mass = torch.zeros(k, dtype=torch.float64, device=x.device).index_add_(0, cluster, w)
        total = torch.zeros(k, dtype=torch.float64, device=x.device).index_add_(0, cluster, w * x)
        moved = torch.where(mass > 0, total / mass.clamp_min(1e-300), centroids)
        if torch.equal(moved, centroids):
            break
        centroids = moved
    return centroids.sort().values.float()


def nearest(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level (sorted ``levels``) for every entry of ``x``."""
    return torch.bucketize(x, (levels[1:] + levels[:-1]) / 2).to(torch.uint8)


@dataclass(frozen=True)
class Calibrated:
    """One layer's fitted datatypes: the key codebook and per-channel centre and half-range (H,), the value codebook."""

    key_levels: torch.Tensor
    key_centre: torch.Tensor
    key_range: torch.Tensor
    value_levels: torch.Tensor


def _outliers(mask: torch.Tensor, x: torch.Tensor, width: int):
    """The masked entries of ``x`` (B, 1, n, width), sparse: per sequence, each outlier's token (int32, its row in the
    run) and channel (int16, ``width`` for a sequence's padding past its own count), and its value; padded only to the
    sequence with most outliers (the dense-and-sparse format's values and column indices, with row indices in place of
    row pointers)."""
    b, _, n, _ = mask.shape
    flat = mask.reshape(b, n * width)
    count = int(flat.sum(-1).max()) if flat.numel() else 0
    order = flat.to(torch.uint8).sort(dim=-1, descending=True, stable=True).indices[:, :count]  # (B, k) positions
    picked = flat.gather(-1, order)
    rows, cols = (order // width).to(torch.int32), (order % width).masked_fill(~picked, width).to(torch.int16)
    return rows, cols, x.reshape(b, n * width).gather(-1, order).masked_fill(~picked, 0)


def _rebuild(codes, scale, centre, rows, cols, exact, *, pos, levels, bits, width, heads, inv_freq, dtype):
    """(B, Hkv, n, D) from a KVQuant chunk: level · half-range + centre, the outliers put back, keys turned by RoPE."""
    x = levels.to(scale.device)[unpack(codes, bits).long()] * scale.float() + centre.float()  # (B, 1, n, H)
    b, _, n, _ = x.shape
    x = torch.cat([x, x[..., :1]], -1).reshape(b, n * (width + 1))  # (a spare column: where padding entries land)
    x = x.scatter(-1, rows.long() * (width + 1) + cols.long(), exact.float()).reshape(b, n, width + 1)[..., :width]
    x = x.reshape(b, n, heads, -1).transpose(1, 2)
    if inv_freq is not None:
        x = rotate(x, pos[..., :n], inv_freq)
    return x.to(dtype)


@dataclass(frozen=True)
class KVQuantCodec(Codec):
    fitted: Calibrated
    inv_freq: torch.Tensor
    bits: int
    outliers: float

    def due(self, held, keys):
        return held

    def join(self, last, new):  # one chunk: the dense parts follow each other, the outlier lists are appended
        *dense_a, rows_a, cols_a, exact_a = last.parts
        *dense_b, rows_b, cols_b, exact_b = new.parts
        dense = [torch.cat([a, b], 2) for a, b in zip(dense_a, dense_b)]
        rows = torch.cat([rows_a, rows_b + dense_a[0].shape[2]], -1)  # (the new run's rows come after the last's)
        return Chunk((*dense, rows, torch.cat([cols_a, cols_b], -1), torch.cat([exact_a, exact_b], -1)), new.rebuild)

    def encode(self, x, valid, pos, keys, prompt):
        b, heads, n, d = x.shape
        if keys:
            x = rotate(x, -pos, self.inv_freq)  # pre-RoPE keys
        flat = x.float().transpose(1, 2).reshape(b, 1, n, heads * d)  # (B, 1, n, H)
        fit = self.fitted
        if keys:
            centre, half = fit.key_centre.to(flat.device), fit.key_range.to(flat.device)
            norm = (flat - centre) / half
            out = norm.abs() > 1
            levels, scale = fit.key_levels, half
        else:
            t = 1 - self.outliers / 2
            hi, lo = percentile(flat, t, -1), percentile(flat, 1 - t, -1)
            out = (flat >= hi) | (flat <= lo) if self.outliers > 0 else torch.zeros_like(flat, dtype=torch.bool)
            inner_hi = flat.masked_fill(out, -math.inf).amax(-1, keepdim=True)
            inner_lo = flat.masked_fill(out, math.inf).amin(-1, keepdim=True)
            centre, scale = (inner_hi + inner_lo) / 2, ((inner_hi - inner_lo) / 2).clamp_min(1e-8)
            norm = (flat - centre) / scale
            levels = fit.value_levels
        codes = pack(nearest(norm.clamp(-1, 1), levels.to(norm.device)), self.bits)
        rows, cols, exact = _outliers(out, flat, heads * d)
        if keys:
            parts = (codes, rows, cols, exact.to(x.dtype))
            rebuild = partial(_key_rebuild, scale=scale, centre=centre)
        else:
            parts = (codes, scale.to(x.dtype), centre.to(x.dtype), rows, cols, exact.to(x.dtype))
            rebuild = _rebuild
        return Chunk(parts, partial(rebuild, levels=levels, bits=self.bits, width=heads * d, heads=heads,
                                    inv_freq=self.inv_freq if keys else None, dtype=x.dtype))


def _key_rebuild(codes, rows, cols, exact, *, scale, centre, **kw):
    """Keys: the per-channel half-range and centre are the layer's (calibrated), not the chunk's."""
    return _rebuild(codes, scale, centre, rows, cols, exact, **kw)


@register
@dataclass
class KVQuant(CachePolicy):
    name = "kvquant"
    summary = "quantise keys per channel before RoPE and values per token to Fisher-weighted non-uniform datatypes " \
              "fitted on calibration text, each vector's outliers kept exactly"
    paper = "KVQuant: Towards 10 Million Context Length LLM Inference with KV Cache Quantization (NeurIPS 2024)"
    zero = {"bits": 16}
    evicts = When.NEVER
    exportable = False  # the cache's chunks grow as tokens come
    sizes_itself = "quantises the cache and keeps every token"

    budget: float = option(1.0, "KVQuant quantises and never evicts: the budget stays 1.0 (the full cache)")
    bits: int = option(4, "bits per entry: 2, 3 or 4 (nuq2, nuq3, nuq4); 16: not quantised")
    outliers: float = option(0.01, "share of each vector kept exactly (half at each tail); 0: dense only")
    calibration: object = option(None, "token ids (N, T) the datatypes are fitted on (a tensor or nested lists)")
    fisher: bool = option(True, "weight the k-means by Fisher information (squared loss gradients); False: unweighted")
    iterations: int = option(50, "k-means iterations")

    def validate(self) -> None:
        super().validate()
        if self.bits not in (2, 3, 4, 16):
            raise ScheduleError(f"bits must be 2, 3, 4 or 16 (not quantised), got {self.bits}")
        if not 0 <= self.outliers < 1:
            raise ScheduleError(f"outliers must lie in [0, 1), got {self.outliers}")

    def layer_codecs(self, model, info):
        if self.bits == 16:
            return (None,) * info.n_layers
        if self.calibration is None:
            raise RecipeError("kvquant fits its datatypes on calibration text: pass calibration=token ids (N, T) "
                              "(e.g. tokenizer(texts).input_ids; the authors use 16 × 2048 tokens of WikiText-2)")
        if info.mrope or None in info.inv_freq:
            raise RecipeError("kvquant quantises keys before RoPE; this model's positions are not one row of rotary "
                              "positions graphprune can read (multimodal RoPE): use another cache recipe")
        if any(hasattr(layer.self_attn, "k_norm") for layer in model.get_decoder().layers):
            raise RecipeError(f"kvquant quantises the key projection's output, but {info.family} normalises keys "
                              "after it (k_norm); use another cache recipe")
        acts, grads = calibrate(model, self.calibration, info, self.fisher)
        codecs = []
        for i in range(info.n_layers):
            codecs.append(KVQuantCodec(self._fit(acts[i], grads[i]), info.inv_freq[i], self.bits, self.outliers))
        return tuple(codecs)

    def _fit(self, acts, grads) -> Calibrated:
        (k, v), (fk, fv) = acts, grads  # (N, T, H) each
        k, v, fk, fv = (t.reshape(-1, t.shape[-1]) for t in (k, v, fk, fv))
        t = 1 - self.outliers / 2
        hi, lo = percentile(k, t, 0), percentile(k, 1 - t, 0)
        centre, half = (hi + lo) / 2, ((hi - lo) / 2).clamp_min(1e-8)
        nk = (k - centre) / half
        inner = nk.abs() <= 1
        key_levels = weighted_kmeans(nk[inner], fk[inner], 2**self.bits, self.iterations)
        vhi, vlo = percentile(v, t, -1), percentile(v, 1 - t, -1)
        nv = (v - (vhi + vlo) / 2) / ((vhi - vlo) / 2).clamp_min(1e-8)
        inner = nv.abs() <= 1
        value_levels = weighted_kmeans(nv[inner], fv[inner], 2**self.bits, self.iterations)
        return Calibrated(key_levels, centre[0], half[0], value_levels)
