"""KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache (Liu et al., ICML 2024)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from graphprune.errors import ScheduleError
from graphprune.kv.cache import EvictingLayer
from graphprune.ops.quant import BITS, dequantize, quantize
from graphprune.recipes.base import option, register
from graphprune.recipes.cache import CacheRecipe


class KiviLayer(EvictingLayer):
    """Keys quantised per channel in groups of ``group`` tokens, values per token (in groups of ``group``
    channels); the newest tokens stay in full precision. ``self.keys`` / ``self.values`` hold those
    residual tokens, the quantised parts live in ``self.kq`` / ``self.vq``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kq: list[tuple] = []  # (codes, scale, min) chunks, oldest first, each a multiple of `group` tokens
        self.vq: list[tuple] = []
        self.nk = self.nv = 0  # tokens in the quantised parts

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.nk + self.keys.shape[-2]

    @property
    def nbytes(self) -> int:
        held = [t for chunk in self.kq + self.vq for t in chunk] + [t for t in (self.keys, self.values) if t is not None]
        return sum(t.numel() * t.element_size() for t in held)

    def kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        keys = [dequantize(c, s, m, self.recipe.bits).flatten(2, 3) for c, s, m in self.kq]  # (B, H, n/G, G, D) chunks
        values = [dequantize(c, s, m, self.recipe.bits).flatten(-2) for c, s, m in self.vq]  # (B, H, n, D/g, g) chunks
        return torch.cat([*keys, self.keys], dim=-2), torch.cat([*values, self.values], dim=-2)

    def quantize_keys(self, n: int) -> None:
        """Move the oldest ``n`` residual keys (a multiple of the group) into the quantised part."""
        g = self.recipe.group
        x = self.keys[..., :n, :]
        b, h, _, d = x.shape
        valid = self.valid[..., self.nk:self.nk + n].reshape(b, h, n // g, g, 1)
        self.kq.append(quantize(x.reshape(b, h, n // g, g, d), self.recipe.bits, axis=3, valid=valid))
        self.keys, self.nk = self.keys[..., n:, :], self.nk + n

    def quantize_values(self, n: int) -> None:
        x = self.values[..., :n, :]
        b, h, _, d = x.shape
        g = self.recipe.group if d % self.recipe.group == 0 else d
        self.vq.append(quantize(x.reshape(b, h, n, d // g, g), self.recipe.bits, axis=-1))
        self.values, self.nv = self.values[..., n:, :], self.nv + n


@register
@dataclass
class KIVI(CacheRecipe):
    name = "kivi"
    summary = "quantise the cache to 2 or 4 bits: keys per channel, values per token; recent tokens in full precision"
    paper = "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache (ICML 2024)"
    zero = {"residual": 2**30}
    evicts_while_decoding = False
    exportable = False  # the quantised and full-precision parts change size as residual blocks fill
    layer_class = KiviLayer

    budget: float = option(1.0, "KIVI quantises and never evicts: the budget stays 1.0 (the full cache)")
    bits: int = option(2, "bits per quantised key/value: 2 or 4 (8 for a check)")
    group: int = option(32, "tokens per key quantisation group; channels per value group")
    residual: int = option(128, "newest tokens kept in full precision (a multiple of group)")

    def validate(self) -> None:
        if self.budget != 1.0:
            raise ScheduleError("kivi quantises the cache and keeps every token: leave budget at 1.0")
        if self.bits not in BITS:
            raise ScheduleError(f"bits must be one of {BITS}, got {self.bits}")
        if self.group < 1 or self.residual < self.group or self.residual % self.group:
            raise ScheduleError(f"residual ({self.residual}) must be a positive multiple of group ({self.group})")

    def observe(self, layer, query, scaling, prompt):
        r = self.residual
        keys_full, values_full = layer.keys.shape[-2], layer.values.shape[-2]
        if prompt:  # the prompt: keys in whole residual blocks, values all but the newest `residual`
            if keys_full >= r:
                layer.quantize_keys(keys_full - keys_full % r)
        elif keys_full >= r:  # a full residual block of keys
            layer.quantize_keys(keys_full)
        if values_full > r:
            layer.quantize_values(values_full - r)
