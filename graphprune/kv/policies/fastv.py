"""FastV: An Image is Worth 1/2 Tokens After Layer 2 (Chen et al., ECCV 2024).

As in the authors' KV-cache code (and ModelTC/llmc's): the last token's attention in layer K-1, mean over heads,
ranks the image tokens; the top round(n·(1-R)) stay, the others leave layers K and above, once, in the prompt pass
(decoding steps attend to the kept set). Kept tokens keep their positions. Text tokens are never dropped. Their
first, cache-less version re-prunes at every generated token instead."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from graphprune.errors import ScheduleError
from graphprune.kv.visual import ImagePolicy, image_slots, least_attended_images
from graphprune.recipes.base import option, register


@register
@dataclass
class FastV(ImagePolicy):
    name = "fastv"
    summary = "after layer K, drop the share R of the image tokens that the last token attends to least in layer K-1"
    paper = "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for Large " \
            "Vision-Language Models (FastV, ECCV 2024)"
    zero = {"ratio": 0.0}
    sizes_itself = "drops a share of the image tokens (set ratio)"

    layer: int = option(2, "K: the layers from K on run without the dropped image tokens")
    ratio: float = option(0.5, "R: the share of the image tokens dropped")

    def validate(self) -> None:
        super().validate()
        if self.layer < 1:
            raise ScheduleError(f"layer (K) must be ≥ 1: the scores are layer K-1's attention, got {self.layer}")
        if not 0 <= self.ratio <= 1:
            raise ScheduleError(f"ratio (R) must lie in [0, 1], got {self.ratio}")

    def fit(self, n_layers):
        if self.layer >= n_layers:
            raise ScheduleError(f"layer (K) must be below the model's {n_layers} layers, got {self.layer}")

    def rows(self, view):
        if not view.prefill or view.layer != self.layer - 1 or self.ratio == 0:
            return None
        image = image_slots(view)
        return least_attended_images(view, image, self.kept(image.sum(-1)))

    def kept(self, n: torch.Tensor) -> torch.Tensor:
        """How many of ``n`` image tokens stay: round(n·(1−R)) (the prompt pass and a static export count alike)."""
        return (n * (1 - self.ratio)).round().long()

    def image_rows_after(self, n, layer, n_layers):
        return n if layer < self.layer - 1 else int(self.kept(torch.tensor(n)))
