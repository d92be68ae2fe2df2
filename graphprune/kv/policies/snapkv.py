"""SnapKV: LLM Knows What You are Looking for Before Generation (Li et al., 2024)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from graphprune.errors import ScheduleError
from graphprune.kv.policy import CachePolicy, When, group_mean
from graphprune.recipes.base import option, register


@register
@dataclass
class SnapKV(CachePolicy):
    name = "snapkv"
    summary = "compress the prompt once: the last window of queries votes for earlier keys (pooled), per head"
    paper = "SnapKV: LLM Knows What You are Looking for Before Generation (2024)"
    evicts = When.PROMPT

    window: int = option(32, "observation window: the last prompt queries that score the earlier keys; always kept")
    kernel: int = option(5, "1-D pooling kernel that smooths the votes")
    pooling: str = option("avg", "pooling of the votes: avg or max")

    def validate(self) -> None:
        super().validate()
        if self.pooling not in ("avg", "max"):
            raise ScheduleError(f"pooling must be 'avg' or 'max', got {self.pooling!r}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ScheduleError(f"kernel must be an odd positive size, got {self.kernel}")

    def min_budget(self) -> int:
        return self.window + 1

    def min_budget_reason(self) -> str:
        return f"the {self.window}-token observation window plus one"

    def recent_tokens(self, capacity):
        return min(self.window, capacity)  # the observation window stays

    def score(self, view):
        """The window's summed attention to each earlier key, pooled over the prefix (zero padded)."""
        w = min(self.window, view.n_new, view.capacity)
        votes = group_mean(view.attention_rows(w).sum(-2))[..., :-w]
        b, h, n = votes.shape
        pool = F.avg_pool1d if self.pooling == "avg" else F.max_pool1d
        votes = pool(votes.reshape(b * h, 1, n), self.kernel, stride=1, padding=self.kernel // 2).reshape(b, h, n)
        return torch.cat([votes, votes.new_zeros(b, h, w)], dim=-1)  # the window itself is protected
