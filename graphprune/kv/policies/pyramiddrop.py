"""PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy Reduction (Xing et al.,
CVPR 2025).

As in the authors' code: the model is split into stages at the boundary layers (1/4, 1/2 and 3/4 of the depth); before
a boundary layer s runs, the last token's attention computed with layer s's own queries and keys over the tokens that
reached it (mean over heads) ranks the image tokens, and int(n·λ^stage) of the n the prompt brought in stay for the
layers from s on. Once, in the prompt pass; decoding steps attend to the kept sets. Text tokens are never dropped.
Kept tokens keep their positions here; the authors' code renumbers them (graphprune does not do that yet)."""

from __future__ import annotations

from dataclasses import dataclass

from graphprune.errors import ScheduleError
from graphprune.kv.visual import ImagePolicy, image_slots, least_attended_images
from graphprune.recipes.base import option, register


@register
@dataclass
class PyramidDrop(ImagePolicy):
    name = "pyramiddrop"
    summary = "in stages: before each boundary layer keep the share λ of the image tokens that the last token " \
              "attends to most (that layer's own attention)"
    paper = "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy Reduction " \
            "(CVPR 2025)"
    zero = {"keep": 1.0}
    sizes_itself = "keeps a share of the image tokens per stage (set keep)"

    layers: list = option([], "boundary layers: image tokens are dropped before each (default: 1/4, 1/2 and 3/4 of "
                              "the depth)")
    keep: float = option(0.5, "λ: the share of the image tokens each stage keeps (of the prompt's: int(n·λ^stage))")

    def validate(self) -> None:
        super().validate()
        if not 0 < self.keep <= 1:
            raise ScheduleError(f"keep (λ) must lie in (0, 1], got {self.keep}")
        if any(not isinstance(s, int) or s < 1 for s in self.layers) or self.layers != sorted(set(self.layers)):
            raise ScheduleError(f"layers must be increasing layer indices ≥ 1, got {self.layers}")

    def fit(self, n_layers):
        if any(s >= n_layers for s in self.layers):
            raise ScheduleError(f"layers must lie below the model's {n_layers} layers, got {self.layers}")

    def boundaries(self, n_layers: int) -> list[int]:
        return self.layers or sorted({n_layers // 4, n_layers // 2, 3 * n_layers // 4} - {0})

    def rows_before(self, view):
        bounds = self.boundaries(view.n_layers)
        if not view.prefill or self.keep == 1 or view.layer not in bounds:
            return None
        stage = bounds.index(view.layer) + 1
        return least_attended_images(view, image_slots(view), (view.images.double() * self.keep ** stage).long())
