"""Rotary position embeddings (rotate-half convention of Llama, Mistral and Qwen): turning keys to new positions."""

from __future__ import annotations

import torch


def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding ``cos``, ``sin`` (broadcast to ``x``'s shape, rotate-half layout) applied to ``x``."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def rotate(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate RoPE'd vectors ``x`` (B, H, N, D) by ``delta`` (B, H, N) more positions (rotate-half convention)."""
    ang = delta.to(torch.float32)[..., None] * inv_freq.to(x.device, torch.float32)
    ang = torch.cat((ang, ang), dim=-1)
    return apply(x.float(), ang.cos(), ang.sin()).to(x.dtype)
