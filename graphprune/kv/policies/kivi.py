"""KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache (Liu et al., ICML 2024)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from graphprune.errors import ScheduleError
from graphprune.kv.policy import CachePolicy, Chunk, Codec, When
from graphprune.ops.quant import BITS, dequantize, quantize
from graphprune.recipes.base import option, register


def _keys(packed, scale, lo, *, bits, pos):  # (B, H, n/G, G, D) codes → (B, H, n, D)
    return dequantize(packed, scale, lo, bits).flatten(2, 3)


def _values(packed, scale, lo, *, bits, pos):  # (B, H, n, D/g, g) codes → (B, H, n, D)
    return dequantize(packed, scale, lo, bits).flatten(-2)


@dataclass(frozen=True)
class KiviCodec(Codec):
    """Keys per channel in groups of ``group`` tokens, a whole ``residual`` block at a time; values per token in groups
    of ``group`` channels (all channels where that does not divide the head), all but the newest ``residual``."""

    bits: int
    group: int
    residual: int

    def due(self, held, keys):
        return held - held % self.residual if keys else max(held - self.residual, 0)

    def encode(self, x, valid, pos, keys, prompt):
        b, h, n, d = x.shape
        if keys:
            g = self.group
            codes = quantize(x.reshape(b, h, n // g, g, d), self.bits, axis=3, valid=valid.reshape(b, h, n // g, g, 1))
            return Chunk(codes, partial(_keys, bits=self.bits))
        g = self.group if d % self.group == 0 else d
        return Chunk(quantize(x.reshape(b, h, n, d // g, g), self.bits, axis=-1), partial(_values, bits=self.bits))


@register
@dataclass
class KIVI(CachePolicy):
    name = "kivi"
    summary = "quantise the cache to 2 or 4 bits: keys per channel, values per token; recent tokens in full precision"
    paper = "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache (ICML 2024)"
    zero = {"residual": 2**30}
    evicts = When.NEVER
    exportable = False  # the quantised and full-precision parts change size as residual blocks fill
    sizes_itself = "quantises the cache and keeps every token"

    budget: float = option(1.0, "KIVI quantises and never evicts: the budget stays 1.0 (the full cache)")
    bits: int = option(2, "bits per quantised key/value: 2 or 4 (8 for a check)")
    group: int = option(32, "tokens per key quantisation group; channels per value group")
    residual: int = option(128, "newest tokens kept in full precision (a multiple of group)")

    def validate(self) -> None:
        super().validate()
        if self.bits not in BITS:
            raise ScheduleError(f"bits must be one of {BITS}, got {self.bits}")
        if self.group < 1 or self.residual < self.group or self.residual % self.group:
            raise ScheduleError(f"residual ({self.residual}) must be a positive multiple of group ({self.group})")

    def codec(self):
        return KiviCodec(self.bits, self.group, self.residual)
