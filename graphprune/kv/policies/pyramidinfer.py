"""PyramidInfer: Pyramid KV Cache Compression for High-throughput LLM Inference (Yang et al., ACL Findings 2024)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from graphprune.errors import ScheduleError
from graphprune.kv.policy import CachePolicy
from graphprune.recipes.base import option, register


@dataclass
class Recent:
    queries: object = None  # (B, Hq, window, D): the queries of the recent window, newest last
    compressed: object = None  # (B,): slots before this one are final (decoded tokens are compressed after it)


@register
@dataclass
class PyramidInfer(CachePolicy):
    name = "pyramidinfer"
    summary = "prune the prompt layer by layer (recent queries pick the pivotal context, fewer with depth); "
    "compress the decoded tokens in blocks"
    paper = "PyramidInfer: Pyramid KV Cache Compression for High-throughput LLM Inference (ACL Findings 2024)"
    zero = {"decay": 1.0, "gen_decay": 1.0, "gen_ratio": 1.0}
    State = Recent
    slot_order = True  # decoded tokens are compressed block by block, in slot order
    exportable = False  # layers keep different, data-dependent numbers of tokens while decoding
    sizes_itself = "follows its retention schedule (set decay)"

    budget: float = option(1.0, "PyramidInfer's retention follows its decay schedule: leave budget at 1.0")
    recent: float = option(0.2, "recent window: this fraction of the prompt (plus the last token) chooses the rest")
    decay: float = option(0.9, "prompt retention at the last layer (cosine schedule from 1 at layer 0)")
    distance_weight: float = option(1.2, "weight of the newest recent query relative to the oldest (linear)")
    sinks: int = option(4, "first tokens always kept")
    min_context: int = option(64, "layers whose context (or kept count) is this small are not compressed")
    interval: int = option(1, "compress the prompt after every interval-th layer")
    block: int = option(16, "decoding: decoded tokens beyond the recent window are compressed this many at a time")
    gen_ratio: float = option(0.9, "decoding: share of a block kept at layer 0, times the decoding schedule")
    gen_decay: float = option(0.1, "decoding: the schedule's value at the last layer")

    def validate(self) -> None:
        super().validate()
        for key in ("recent", "decay", "gen_ratio", "gen_decay"):
            if not 0 < getattr(self, key) <= 1:
                raise ScheduleError(f"{key} must lie in (0, 1], got {getattr(self, key)}")
        if self.interval < 1 or self.block < 1:
            raise ScheduleError("interval and block must be ≥ 1")

    @staticmethod
    def schedule(layer: int, n_layers: int, floor: float) -> float:
        return (1 - floor) * (math.cos(math.pi * layer / n_layers) + 1) / 2 + floor

    def capacity(self, layer, n_layers, prompt_len):
        return None  # the retention schedule decides

    def _scores(self, view, queries, columns: slice) -> torch.Tensor:
        """Head-averaged attention of ``queries`` (the newest slots' queries), newest weighted most, (B, len(columns))."""
        r = queries.shape[2]
        att = view.attention_rows(r, queries).mean(dim=(1, 2))[..., columns]  # (B, r, C)
        weight = torch.linspace(1.0, self.distance_weight, r, device=att.device)[None, :, None]
        return (att * weight).mean(1)

    def rows(self, view):
        """At the prompt: the context tokens that stop here (the recent window and the chosen context go on)."""
        if not view.prefill:
            return None
        n, idx, n_layers = view.slots, view.layer, view.n_layers
        window = 1 + int(view.prompt_len * self.recent)
        context = n - window
        ratio = self.schedule(idx, n_layers, self.decay)
        keep = int(context * ratio)
        if idx % self.interval or context <= self.min_context or ratio >= 1 or keep <= self.min_context:
            return None
        score = self._scores(view, view.queries[:, :, -window:], slice(0, context))
        real = view.valid[:, 0, :context]
        score = score.masked_fill(real & (real.cumsum(-1) <= self.sinks), math.inf).masked_fill(~real, -math.inf)
        chosen = score.topk(keep, dim=-1).indices
        stop = torch.ones_like(view.valid[:, 0]).scatter(1, chosen, False)
        stop[:, context:] = False
        return stop

    def update(self, view):
        st = view.state
        if view.prefill:
            window = 1 + int(view.prompt_len * self.recent)
            st.queries = view.queries[:, :, -window:]
            st.compressed = torch.full((view.queries.shape[0],), view.slots - window, device=view.queries.device)
        else:
            st.queries = torch.cat([st.queries, view.queries], dim=2)[:, :, -st.queries.shape[2]:]

    def score(self, view):
        """Nothing goes until `block` decoded tokens wait after the compressed part; then the recent queries keep the
        best of them."""
        st, window = view.state, view.state.queries.shape[2]
        drop = torch.zeros_like(view.valid, dtype=torch.float32)
        start = int(st.compressed[0])
        if view.prefill or view.slots - window - start < self.block:
            return drop
        span = slice(start, start + self.block)
        score = self._scores(view, st.queries, span)  # (B, block)
        ratio = self.schedule(view.layer, view.n_layers, self.gen_decay)
        keep = max(int(self.block * self.gen_ratio * ratio), 1)
        chosen = score.masked_fill(~view.valid[:, 0, span], -math.inf).topk(keep, -1).indices
        gone = torch.ones_like(score, dtype=torch.bool).scatter(1, chosen, False)  # (B, block)
        drop[:, :, span] = drop[:, :, span].masked_fill(gone[:, None], -math.inf)
        st.compressed = torch.full_like(st.compressed, start + keep)
        return drop
