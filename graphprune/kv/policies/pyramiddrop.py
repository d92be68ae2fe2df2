"""PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy Reduction (Xing et al.,
CVPR 2025).

As in the authors' code: the model is split into stages at the boundary layers (1/4, 1/2 and 3/4 of the depth); before
a boundary layer s runs, the last token's attention computed with layer s's own queries and keys over the tokens that
reached it (mean over heads) ranks the image tokens, and int(n·λ^stage) of the n the prompt brought in stay for the
layers from s on. Once, in the prompt pass; decoding steps attend to the kept sets. Text tokens are never dropped.
Kept tokens keep their positions by default; ``positions="renumber"`` numbers them as the authors' code does: from a
boundary layer on, the prompt's tokens left are numbered 0, 1, … in order, and each decoding step's token moves down
by the image tokens dropped up to that stage (so every stage has its own positions)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from graphprune.errors import ScheduleError
from graphprune.kv.visual import ImagePolicy, image_slots, least_attended_images
from graphprune.recipes.base import option, register


@dataclass
class Dropped:
    before: torch.Tensor | None = None  # (B,) tokens dropped up to this boundary's stage (its layers' position shift)


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
    positions: str = option("keep", "'keep': kept tokens keep their positions; 'renumber': each stage numbers its "
                                    "tokens afresh, as the authors' code does")
    State = Dropped

    def validate(self) -> None:
        super().validate()
        if not 0 < self.keep <= 1:
            raise ScheduleError(f"keep (λ) must lie in (0, 1], got {self.keep}")
        if any(not isinstance(s, int) or s < 1 for s in self.layers) or self.layers != sorted(set(self.layers)):
            raise ScheduleError(f"layers must be increasing layer indices ≥ 1, got {self.layers}")
        if self.positions not in ("keep", "renumber"):
            raise ScheduleError(f"positions must be 'keep' or 'renumber', got {self.positions!r}")

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
        return least_attended_images(view, image_slots(view), self.kept(view.images, stage))

    def kept(self, n: torch.Tensor, stage: int) -> torch.Tensor:
        """How many of the prompt's ``n`` image tokens stage ``stage`` keeps: int(n·λ^stage) (the prompt pass and a
        static export count alike)."""
        return (n.double() * self.keep ** stage).long()

    def image_rows_after(self, n, layer, n_layers):
        if self.positions == "renumber":
            return None  # (the export keeps positions)
        stage = sum(s <= layer for s in self.boundaries(n_layers))
        return int(self.kept(torch.tensor(n), stage))

    def new_state(self):
        return super().new_state() if self.positions == "renumber" else None  # (kept positions need no state)

    def renumbers(self) -> bool:
        return self.positions == "renumber"

    def renumber(self, view):
        if self.positions != "renumber" or view.layer not in self.boundaries(view.n_layers):
            return None
        st = view.state
        if view.prefill:  # the rows left, numbered afresh in order; the shift later steps take at this stage
            left = view.query_real.clone()
            if view.selected is not None:
                left &= view.selected[:, view.slots - view.n_new:]
            new = (left.long().cumsum(-1) - 1).clamp(min=0)
            st.before = view.query_pos.masked_fill(~left, -1).amax(-1) - new.masked_fill(~left, -1).amax(-1)
            return new
        return None if st.before is None else view.query_pos - st.before[:, None]
