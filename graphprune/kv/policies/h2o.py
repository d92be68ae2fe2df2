"""H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs (Zhang et al., NeurIPS 2023)."""

from __future__ import annotations

from dataclasses import dataclass

from graphprune.errors import ScheduleError
from graphprune.kv.policy import CachePolicy, group_mean, slot_field
from graphprune.recipes.base import option, register


@dataclass
class Accumulated:
    acc: object = slot_field("attention each slot has received from every query so far, (B, Hkv, N)")


@register
@dataclass
class H2O(CachePolicy):
    name = "h2o"
    summary = "keep the heavy hitters (most accumulated attention) plus the most recent tokens, at every step"
    paper = "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models (NeurIPS 2023)"
    State = Accumulated

    recent: float = option(0.5, "share of the budget given to the most recent tokens (the rest: heavy hitters)")

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.recent <= 1:
            raise ScheduleError(f"recent must be a share of the budget in [0, 1], got {self.recent}")

    def recent_tokens(self, capacity):
        return int(round(self.recent * capacity))

    def update(self, view):
        if view.prefill:  # every prompt query's attention, accumulated per key (row chunks)
            view.state.acc = group_mean(view.attention_columns())
        else:
            view.state.acc = view.state.acc + group_mean(view.attention_rows(view.n_new).sum(-2))

    def score(self, view):
        return view.state.acc
