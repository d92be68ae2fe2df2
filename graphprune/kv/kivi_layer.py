"""KIVI's cache layer: quantised keys and values plus a full-precision residual (see recipes/kivi.py)."""

from __future__ import annotations

import torch

from graphprune.kv.cache import EvictingLayer
from graphprune.ops.quant import dequantize, quantize


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
