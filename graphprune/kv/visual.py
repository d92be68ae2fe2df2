"""What the policies that prune a vision-language model's image tokens inside its language model share."""

from __future__ import annotations

import torch

from graphprune.kv.view import View


def image_slots(view: View) -> torch.Tensor:
    """(B, N) bool: the slots that hold this call's image tokens."""
    image = torch.zeros_like(view.valid[:, 0])
    image[:, view.slots - view.n_new:] = view.visual & view.query_real
    return image


def least_attended_images(view: View, keep: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N) bool: the image slots (``image``, default :func:`image_slots`) to drop, all but the ``keep`` (B,) that
    the last token attends to most (its attention at this layer, mean over heads); among equal scores the earlier
    slot stays."""
    image = image_slots(view) if image is None else image
    score = view.attention_rows(1)[..., -1, :].mean(dim=(1, 2))  # (B, N)
    rank = score.masked_fill(~image, -torch.inf).argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
    return image & (rank >= keep[:, None])
