"""What the policies that reduce a vision-language model's image tokens share: their base class, and the scorers of
the ones that prune inside the language model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from graphprune.kv.policy import CachePolicy, When
from graphprune.kv.view import View
from graphprune.recipes.base import option


@dataclass
class ImagePolicy(CachePolicy):
    """A policy that reduces image tokens (before or inside the language model) by its own options and evicts nothing
    from the cache; vision-language models only."""

    evicts = When.NEVER
    needs_images = True
    exportable = False  # the number of image tokens kept depends on the call (or the data)
    sizes_itself = "reduces image tokens by its own options"

    budget: float = option(1.0, "image-token recipes reduce image tokens by their own options and evict nothing: leave "
                                "budget at 1.0")


def image_slots(view: View) -> torch.Tensor:
    """(B, N) bool: the slots that hold this call's image tokens."""
    image = torch.zeros_like(view.valid[:, 0])
    image[:, view.slots - view.n_new:] = view.visual & view.query_real
    return image


def least_attended_images(view: View, image: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, N) bool: the image slots ``image`` (:func:`image_slots`) to drop, all but the ``keep`` (B,) that the last
    token attends to most (its attention at this layer, mean over heads); among equal scores the earlier slot stays."""
    score = view.attention_rows(1)[..., -1, :].mean(dim=(1, 2)).masked_fill(~image, -torch.inf)  # (B, N)
    return image & (rank_descending(score) >= keep[:, None])


def rank_descending(score: torch.Tensor) -> torch.Tensor:
    """(B, N): each score's rank in its row, highest first, the earlier one first among equal scores (a stable sort's
    order, counted pairwise: exports to ONNX, which has no stable sort)."""
    n = score.shape[-1]
    above = score[:, None, :] > score[:, :, None]  # [b, i, j]: j ranks above i
    earlier = torch.ones(n, n, dtype=torch.bool, device=score.device).tril(-1)  # [i, j]: j < i
    return (above | ((score[:, None, :] == score[:, :, None]) & earlier)).sum(-1)
