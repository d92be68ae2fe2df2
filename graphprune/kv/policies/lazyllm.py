"""LazyLLM: Dynamic Token Pruning for Efficient Long Context LLM Inference (Fu et al., 2024)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from graphprune.errors import ScheduleError
from graphprune.kv.policy import CachePolicy, When
from graphprune.recipes.base import option, register


@register
@dataclass
class LazyLLM(CachePolicy):
    name = "lazyllm"
    summary = "in every forward, prune the tokens the last token attends to least, progressively with depth; " \
              "pruned tokens may revive later from the Aux Cache"
    paper = "LazyLLM: Dynamic Token Pruning for Efficient Long Context LLM Inference (ICML 2024 ES-FoMo workshop)"
    zero = {"rate": 0.0}
    evicts = When.NEVER
    revives = True
    exportable = False  # each forward computes a data-dependent set of tokens per layer
    sizes_itself = "computes keys and values only for the tokens it selects (set rate)"

    budget: float = option(1.0, "LazyLLM prunes by rate and never evicts: leave budget at 1.0")
    rate: float = option(0.1, "share of the tokens at a pruning layer (the last one's attention, head mean) that it "
                              "prunes for the layers above")
    start: int = option(2, "first pruning layer")
    every: int = option(1, "prune after every this-many-th layer from start")

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.rate < 1:
            raise ScheduleError(f"rate must lie in [0, 1), got {self.rate}")
        if self.start < 0 or self.every < 1:
            raise ScheduleError("start must be ≥ 0 and every ≥ 1")

    def rate_at(self, layer: int, n_layers: int) -> float:
        """The share layer ``layer`` prunes (none at the last layer: no layer above it)."""
        prunes = layer >= self.start and (layer - self.start) % self.every == 0 and layer < n_layers - 1
        return self.rate if prunes else 0.0

    def rows(self, view):
        """Deselect the lowest-scored share of the tokens the last token sees (its attention, mean over heads)."""
        rate = self.rate_at(view.layer, view.n_layers)
        if rate <= 0:
            return None
        see = view.visible(view.n_new - 1)[:, 0, 0, 0]  # (B, N): what the last token sees
        score = view.attention_rows(1)[..., -1, :].mean(dim=(1, 2))  # (B, N)
        count = (rate * see.sum(-1)).floor().long()  # the paper's percentile of the tokens at this layer
        candidate = see.clone()
        candidate[:, -1] = False  # the last token (the newest slot) is never pruned
        rank = score.masked_fill(~candidate, math.inf).argsort(dim=-1, stable=True).argsort(-1)
        return candidate & (rank < count[:, None])
