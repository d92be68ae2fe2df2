"""Asymmetric min-max integer quantisation with bit packing (KIVI's cache format).

``quantize(x, bits, axis)`` quantises ``x`` with one (scale, minimum) pair per slice taken
along ``axis``: codes = round((x − min) / scale), scale = (max − min) / (2^bits − 1). Codes are
packed 8 / bits to a byte along the last dimension.
"""

from __future__ import annotations

import torch

BITS = (2, 4, 8)


def quantize(x: torch.Tensor, bits: int, axis: int, valid: torch.Tensor | None = None):
    """(packed codes uint8, scale, minimum); ``valid`` (broadcastable to x) leaves entries out of the min/max."""
    levels = 2**bits - 1
    if valid is None:
        lo, hi = x.amin(axis, keepdim=True), x.amax(axis, keepdim=True)
    else:
        lo = x.masked_fill(~valid, float("inf")).amin(axis, keepdim=True)
        hi = x.masked_fill(~valid, float("-inf")).amax(axis, keepdim=True)
        lo, hi = lo.nan_to_num(0.0, posinf=0.0, neginf=0.0), hi.nan_to_num(0.0, posinf=0.0, neginf=0.0)
        hi = torch.maximum(hi, lo)
    scale = (hi - lo) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = ((x - lo) / scale).round().clamp(0, levels).to(torch.uint8)
    return pack(codes, bits), scale, lo


def quantize_zero_point(x: torch.Tensor, bits: int):
    """Asymmetric quantisation over the last dimension with an integer zero point (as Palu's and Q-Hitter's code):
    scale = max(max − min, 1e-5) / (2^bits − 1), zero = clamp(round(−min / scale)), codes = clamp(round(x / scale) +
    zero). Returns (packed codes uint8, scale, zero (uint8)), the last two with a last dimension of 1."""
    levels = 2**bits - 1
    scale = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)).clamp_min(1e-5) / levels
    zero = (-x.amin(-1, keepdim=True) / scale).round().clamp(0, levels)
    codes = ((x / scale).round() + zero).clamp(0, levels).to(torch.uint8)
    return pack(codes, bits), scale, zero.to(torch.uint8)


def dequantize_zero_point(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return (unpack(packed, bits).float() - zero.float()) * scale.float()


def dequantize(packed: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack(packed, bits).to(scale.dtype) * scale + lo


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., D) codes < 2^bits → (..., D·bits/8) bytes (D a multiple of 8 where 8 is not a multiple of bits)."""
    if 8 % bits:  # eight codes fill `bits` bytes exactly
        c = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 8, 8).long()
        word = sum(c[..., i] << (i * bits) for i in range(8))
        return torch.stack([(word >> (8 * j)) & 255 for j in range(bits)], -1).flatten(-2).to(torch.uint8)
    per = 8 // bits
    c = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    out = torch.zeros(c.shape[:-1], dtype=torch.uint8, device=codes.device)
    for i in range(per):
        out |= c[..., i] << (i * bits)
    return out


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    mask = 2**bits - 1
    if 8 % bits:
        b = packed.reshape(*packed.shape[:-1], packed.shape[-1] // bits, bits).long()
        word = sum(b[..., j] << (8 * j) for j in range(bits))
        return torch.stack([(word >> (i * bits)) & mask for i in range(8)], -1).flatten(-2).to(torch.uint8)
    per = 8 // bits
    parts = [(packed >> (i * bits)) & mask for i in range(per)]
    return torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * per)
