"""What the policies that prune a vision-language model's image tokens inside its language model share."""

from __future__ import annotations

from typing import Callable

import torch

from graphprune.kv.view import View


def image_slots(view: View) -> torch.Tensor:
    """(B, N) bool: the slots that hold this call's image tokens."""
    image = torch.zeros_like(view.valid[:, 0])
    image[:, view.slots - view.n_new:] = view.visual & view.query_real
    return image


def least_attended_images(view: View, count: Callable[[torch.Tensor], torch.Tensor],
                          among: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N) bool: the image slots (``among`` them, default all) that the last token attends to least (its attention
    at this layer, mean over heads), ``count(n)`` of them per sequence where n (B,) is how many there are; ties go
    to the earlier slot."""
    image = image_slots(view) if among is None else among
    score = view.attention_rows(1)[..., -1, :].mean(dim=(1, 2))  # (B, N)
    rank = score.masked_fill(~image, torch.inf).argsort(dim=-1, stable=True).argsort(dim=-1)
    return image & (rank < count(image.sum(-1))[:, None])
