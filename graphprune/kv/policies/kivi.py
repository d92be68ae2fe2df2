"""KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache (Liu et al., ICML 2024)."""

from __future__ import annotations

from dataclasses import dataclass

from graphprune.errors import ScheduleError
from graphprune.kv.policy import CachePolicy, Quantization, When
from graphprune.ops.quant import BITS
from graphprune.recipes.base import option, register


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

    def quantization(self):
        return Quantization(self.bits, self.group, self.residual)
