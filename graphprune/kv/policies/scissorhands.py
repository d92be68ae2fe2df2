"""Scissorhands: Exploiting the Persistence of Importance Hypothesis for LLM KV Cache Compression at Test Time
(Liu et al., NeurIPS 2023)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from graphprune.errors import ScheduleError
from graphprune.kv.policy import CachePolicy, group_mean, slot_field
from graphprune.recipes.base import option, register


@dataclass
class History:
    low: object = slot_field("per slot, for each of the last `history` queries: share of heads that found it unimportant")


@register
@dataclass
class Scissorhands(CachePolicy):
    name = "scissorhands"
    summary = "at the budget, drop the tokens that were least often pivotal (attention ≥ 1/t) over a history window"
    paper = "Scissorhands: Exploiting the Persistence of Importance Hypothesis for LLM KV Cache Compression (NeurIPS 2023)"
    State = History

    history: int = option(32, "history window: the last queries whose attention decides importance")
    recent: int = option(8, "most recent tokens that are never dropped")

    def validate(self) -> None:
        super().validate()
        if self.history < 1 or self.recent < 0:
            raise ScheduleError(f"history must be ≥ 1 and recent ≥ 0, got {self.history} and {self.recent}")

    def min_budget(self) -> int:
        return self.recent + 1

    def min_budget_reason(self) -> str:
        return f"the {self.recent} recent tokens plus one"

    def recent_tokens(self, capacity):
        return self.recent

    def update(self, view):
        rows = min(self.history, view.n_new)
        att = view.attention_rows(rows)  # (B, Hkv, G, rows, N)
        seen = view.visible(view.n_new - rows)
        # a token is unimportant to a query when its attention is below the average, 1/t over the t tokens it sees
        low = group_mean((seen & (att < 1.0 / seen.sum(-1, keepdim=True).clamp(min=1))).float())  # (B, Hkv, rows, N)
        low = low.transpose(-1, -2)  # (B, Hkv, N, rows)
        old = view.state.low
        if old is None:
            old = low.new_zeros(*low.shape[:3], self.history)
        view.state.low = torch.cat([old, low], dim=-1)[..., -self.history:]

    def score(self, view):
        # most often unimportant goes first; among equal counts the older token goes first
        age = view.positions / (view.newest() + 1)
        return -view.state.low.sum(-1) + 1e-3 * age
