"""H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs (Zhang et al., NeurIPS 2023)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from graphprune.errors import ScheduleError
from graphprune.recipes.base import option, register
from graphprune.recipes.cache import CacheRecipe, group_mean


@register
@dataclass
class H2O(CacheRecipe):
    name = "h2o"
    summary = "keep the heavy hitters (most accumulated attention) plus the most recent tokens, at every step"
    paper = "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models (NeurIPS 2023)"

    state = ("acc",)
    ring = True

    recent: float = option(0.5, "share of the budget given to the most recent tokens (the rest: heavy hitters)")

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.recent <= 1:
            raise ScheduleError(f"recent must be a share of the budget in [0, 1], got {self.recent}")

    def observe(self, layer, query, scaling, prompt):
        if prompt:  # every prompt query's attention, accumulated per key (row chunks)
            layer.state["acc"] = group_mean(layer.attention_column_sums(query, scaling))
        else:
            rows = layer.attention_rows(query, scaling, query.shape[2])
            layer.state["acc"] = layer.fresh(layer.state["acc"]) + group_mean(rows.sum(-2))

    def select(self, layer, query, scaling, capacity):
        return layer.top(layer.state["acc"], capacity, protect=layer.recent(int(round(self.recent * capacity))))
