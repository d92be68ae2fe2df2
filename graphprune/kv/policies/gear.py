"""GEAR: An Efficient KV Cache Compression Recipe for Near-Lossless Generative Inference of LLM (Kang et al., 2024).

Each run of cached keys or values X is stored as X ≈ D + L + S: S the sparse outliers (in every row, the largest and
the smallest ``outliers``/2 share of the entries, kept exactly), D the low-bit quantisation of the rest (KIVI's
backbone: keys per channel in groups of ``group`` tokens, values per token in groups of ``group`` entries; the outliers
replaced by their row's mean first), and L a low-rank approximation of what quantisation missed, X − D − S, per
sequence and KV head, by power iteration (``iterations`` rounds from a seeded uniform start, orthonormalised in the last
one). Streaming as the paper and the authors' CUDA path describe it (opengear-project/GEAR at efe0bfe): the prompt is
compressed once at rank ``prompt_rank`` (all but its last ``len % buffer`` tokens), later tokens wait in a
full-precision buffer and every full ``buffer`` is compressed as its own chunk at rank ``rank``.

Where the authors' code differs, by design: their simulated evaluator re-compresses the whole cache every ``buffer``
steps (and drops the prompt's compression); their key rows count outliers as if rows were tokens (s·H·d/2 per channel,
not s of the channel's entries); the number of levels is ``bits**2 − 1`` (the same as 2^bits − 1 at 2 and 4 bits); the
power iteration starts unseeded. Here each chunk is compressed once, every row keeps the share ``outliers`` of its
entries, and the start is seeded (one draw for every sequence: a batch compresses as each sequence alone). Padding takes
no part in the statistics (min/max, outliers, means, the low-rank fit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch

from graphprune.errors import ScheduleError
from graphprune.kv.policy import CachePolicy, Chunk, Codec, When
from graphprune.ops.quant import BITS, dequantize, quantize
from graphprune.recipes.base import option, register


def outliers(rows: torch.Tensor, real: torch.Tensor, share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The indices (…, 2k) of each row's k largest and k smallest real entries, k = ⌊share · real entries / 2⌋ (a row
    with fewer names a padding entry for the rest), and the rows with those entries set to the mean of the row's real
    entries."""
    count = real.sum(-1, keepdim=True)
    mean = rows.masked_fill(~real, 0).sum(-1, keepdim=True) / count.clamp_min(1)
    k = int(share * rows.shape[-1] / 2)
    if k == 0:
        return rows.new_zeros(*rows.shape[:-1], 0, dtype=torch.long), rows
    mine = (share * count.double() / 2).floor().long()  # (…, 1): this row's k
    rank = torch.arange(k, device=rows.device)
    spare = (~real).long().argmax(-1, keepdim=True)  # a padding entry, where the row has one
    hi = rows.masked_fill(~real, -math.inf).topk(k, -1).indices
    lo = rows.masked_fill(~real, math.inf).topk(k, -1, largest=False).indices
    idx = torch.cat([hi, lo], -1).where(torch.cat([rank, rank]) < mine, spare)
    return idx, rows.scatter(-1, idx, mean.expand_as(idx)).where(real, rows)


def low_rank(err: torch.Tensor, rank: int, iterations: int, start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Power iteration on ``err`` (…, n, D): Q (…, n, r) orthonormal and P (…, D, r) with Q Pᵀ ≈ err (the projection
    of err on its leading subspace); ``start`` (D, r) the first guess of P."""
    p = start.expand(*err.shape[:-2], *start.shape)
    for i in range(iterations):
        last = i == iterations - 1
        if last:
            p = torch.linalg.qr(p).Q
        q = err @ p
        if last:
            q = torch.linalg.qr(q).Q
        p = err.transpose(-1, -2) @ q
    return q, p


def _rebuild(packed, scale, lo, idx, exact, q, p, *, bits: int, keys: bool, heads: int, pos=None):
    """(B, H, n, D) from a GEAR chunk: the dequantised rows, the outliers put back, plus the low-rank part."""
    rows = dequantize(packed, scale.float(), lo.float(), bits).flatten(-2)  # (B, H, D, n) keys, (B, n, H·D) values
    rows = rows.scatter(-1, idx.long(), exact.float())
    b, n, d = q.shape[0], q.shape[2], p.shape[2]
    x = rows.transpose(-1, -2) if keys else rows.reshape(b, n, heads, d).transpose(1, 2)
    return x + q.float() @ p.float().transpose(-1, -2)


@dataclass(frozen=True)
class GearCodec(Codec):
    bits: int
    group: int
    outliers: float
    rank: int
    prompt_rank: int
    buffer: int
    iterations: int
    seed: int

    def due(self, held, keys):
        return held - held % self.buffer

    def encode(self, x, valid, pos, keys, prompt):
        b, h, n, d = x.shape
        xf = x.float()
        if keys:  # rows: each channel over the run's tokens, quantised in groups of `group` tokens
            rows, real, g = xf.transpose(-1, -2), valid[:, :, None, :], self.group
        else:  # rows: each token's entries over every KV head, quantised in groups of `group` entries
            rows, real = xf.transpose(1, 2).reshape(b, n, h * d), valid.any(1)[:, :, None]
            g = self.group if (h * d) % self.group == 0 else h * d
        real = real.expand_as(rows)
        idx, filled = outliers(rows, real, self.outliers)
        length = rows.shape[-1]
        packed, scale, lo = quantize(filled.reshape(*rows.shape[:-1], length // g, g), self.bits, axis=-1,
                                     valid=real.reshape(*rows.shape[:-1], length // g, g))
        scale, lo, exact = scale.to(x.dtype), lo.to(x.dtype), rows.gather(-1, idx).to(x.dtype)  # as held
        approx = dequantize(packed, scale.float(), lo.float(), self.bits).flatten(-2).scatter(-1, idx, exact.float())
        err = rows - approx
        err = (err.transpose(-1, -2) if keys else err.reshape(b, n, h, d).transpose(1, 2))  # (B, H, n, D)
        err = err.masked_fill(~valid[..., None], 0)
        rank = min(self.prompt_rank if prompt else self.rank, n, d)
        start = torch.rand(d, rank, generator=torch.Generator().manual_seed(self.seed)).to(err.device)
        q, p = low_rank(err, rank, self.iterations, start) if rank else (err[..., :0], err[..., :0, :].transpose(-1, -2))
        small = torch.int16 if length <= 2**15 else torch.int32
        parts = (packed, scale, lo, idx.to(small), exact, q.to(x.dtype), p.to(x.dtype))
        return Chunk(parts, partial(_rebuild, bits=self.bits, keys=keys, heads=h))


@register
@dataclass
class GEAR(CachePolicy):
    name = "gear"
    summary = "quantise the cache (KIVI's backbone), keep each row's outliers exactly, and add a low-rank " \
              "approximation of the quantisation error"
    paper = "GEAR: An Efficient KV Cache Compression Recipe for Near-Lossless Generative Inference of LLM (2024)"
    zero = {"buffer": 2**30}
    evicts = When.NEVER
    exportable = False  # chunks are compressed as the buffer fills: the cache's parts change size
    sizes_itself = "compresses the cache and keeps every token"

    budget: float = option(1.0, "GEAR compresses and never evicts: the budget stays 1.0 (the full cache)")
    bits: int = option(2, "bits per quantised entry: 2 or 4 (8 for a check)")
    group: int = option(64, "tokens per key quantisation group; entries per value group")
    outliers: float = option(0.02, "share of each row's entries kept exactly (half the largest, half the smallest)")
    rank: int = option(2, "rank of the low-rank error of each decoded chunk (per sequence and KV head)")
    prompt_rank: int = option(4, "rank of the low-rank error of the prompt")
    buffer: int = option(64, "newest tokens kept in full precision until they are compressed as a chunk (a multiple "
                             "of group)")
    iterations: int = option(3, "power-iteration rounds of the low-rank fit")
    seed: int = option(0, "seed of the power iteration's start")

    def validate(self) -> None:
        super().validate()
        if self.bits not in BITS:
            raise ScheduleError(f"bits must be one of {BITS}, got {self.bits}")
        if self.group < 1 or self.buffer < self.group or self.buffer % self.group:
            raise ScheduleError(f"buffer ({self.buffer}) must be a positive multiple of group ({self.group})")
        if self.group % (8 // self.bits):
            raise ScheduleError(f"group ({self.group}) must be a multiple of {8 // self.bits} at {self.bits} bits (codes "
                                "are packed a byte at a time within a group)")
        if not 0 <= self.outliers < 1:
            raise ScheduleError(f"outliers must lie in [0, 1), got {self.outliers}")
        if min(self.rank, self.prompt_rank) < 0 or self.iterations < 1:
            raise ScheduleError("rank and prompt_rank must be ≥ 0 and iterations ≥ 1")

    def codec(self):
        return GearCodec(self.bits, self.group, self.outliers, self.rank, self.prompt_rank, self.buffer,
                         self.iterations, self.seed)
