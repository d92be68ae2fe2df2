"""DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models (Alvar et al., CVPR 2025).

As in the authors' code: before the language model, each image's projected tokens are reduced to round(keep·n) by
greedy max–min diversity on cosine distance (1 − cosine similarity of the tokens): first the token farthest from its
nearest neighbour, then each time the token whose distance to the chosen set (its nearest chosen token) is largest;
ties go to the first. The kept tokens stay in their order. Differences: chosen tokens are never chosen again (the
authors' loop relies on their self-distance being 0, which only duplicates break), distances are computed in float32
(theirs in the model's float16), every image of every sequence is reduced (theirs: the first image of the first
sequence), and kept tokens keep their positions by default (theirs close up, the sequence being shorter:
``positions="renumber"``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from graphprune.errors import ScheduleError
from graphprune.kv.visual import ImagePolicy
from graphprune.recipes.base import option, register


def max_min_diverse(features: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max–min diversity under cosine distance: sorted indices (..., k) of ``features`` (..., n, C), each set of
    n tokens on its own; tensor operations only (the same ``k`` steps export to ONNX)."""
    x = torch.nn.functional.normalize(features.float(), dim=-1)  # (a zero token: distance 1 to every token)
    dist = 1 - x @ x.transpose(-1, -2)
    n = dist.shape[-1]

    def row(j):  # each set's distances to its token j
        return dist.gather(-2, j[..., None, None].expand(*j.shape, 1, n)).squeeze(-2)

    nearest = dist.topk(2, dim=-1, largest=False).values[..., 1]  # (the smallest is a token's distance to itself)
    j = nearest.argmax(-1)  # first the token farthest from its nearest neighbour
    chosen, gap = [j], row(j).scatter(-1, j[..., None], -torch.inf)  # gap: each token's distance to the chosen set
    for _ in range(1, k):
        j = gap.argmax(-1)
        chosen.append(j)
        gap = torch.minimum(gap, row(j)).scatter(-1, j[..., None], -torch.inf)
    return torch.stack(chosen, -1).sort(-1).values


@register
@dataclass
class DivPrune(ImagePolicy):
    name = "divprune"
    summary = "before the language model, keep the most diverse share of each image's tokens (greedy max-min " \
              "cosine distance)"
    paper = "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models (CVPR 2025)"
    zero = {"keep": 1.0}
    sizes_itself = "keeps a share of the image tokens (set keep)"

    keep: float = option(0.098, "share of each image's tokens kept, round(keep·n) (0.098: 56 of LLaVA-1.5's 576)")
    positions: str = option("keep", "'keep': kept tokens keep their positions; 'renumber': they close up (the "
                                    "authors' code, whose sequence is simply shorter)")

    def validate(self) -> None:
        super().validate()
        if not 0 < self.keep <= 1:
            raise ScheduleError(f"keep must lie in (0, 1], got {self.keep}")
        if self.positions not in ("keep", "renumber"):
            raise ScheduleError(f"positions must be 'keep' or 'renumber', got {self.positions!r}")

    def renumbers(self) -> bool:
        return self.positions == "renumber"

    def image_tokens(self, image):
        return None if self.keep == 1.0 else self.fixed_image_tokens(image.features[None])[0]

    def fixed_image_tokens(self, features):
        n = features.shape[-2]
        k = min(max(round(self.keep * n), 1), n)
        return max_min_diverse(features, k)
