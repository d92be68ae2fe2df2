"""PyramidInfer: Pyramid KV Cache Compression for High-throughput LLM Inference (Yang et al., ACL Findings 2024)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from graphprune.errors import ScheduleError
from graphprune.recipes.base import option, register
from graphprune.recipes.cache import CacheRecipe


@register
@dataclass
class PyramidInfer(CacheRecipe):
    name = "pyramidinfer"
    summary = "prune the prompt layer by layer (recent queries pick the pivotal context, fewer with depth); "
    "compress the decoded tokens in blocks"
    paper = "PyramidInfer: Pyramid KV Cache Compression for High-throughput LLM Inference (ACL Findings 2024)"
    zero = {"decay": 1.0, "gen_decay": 1.0, "gen_ratio": 1.0}
    prunes_prompt = True
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

    def _scores(self, layer, queries, scaling, columns: slice) -> torch.Tensor:
        """Head-averaged attention of ``queries`` (the newest slots' queries), newest weighted most, (B, len(columns))."""
        r = queries.shape[2]
        att = layer.attention_rows(queries, scaling, r).mean(dim=(1, 2))[..., columns]  # (B, r, C)
        weight = torch.linspace(1.0, self.distance_weight, r, device=att.device)[None, :, None]
        return (att * weight).mean(1)

    def prompt_selection(self, layer, query, scaling):
        n, idx, n_layers = layer.length, layer.layer_idx, layer.n_layers
        window = 1 + int(layer.prompt_len * self.recent)
        layer.aux["recent_q"] = query[:, :, -window:]
        layer.aux["compressed"] = torch.full((query.shape[0],), n - window)  # slots before this are final
        context = n - window
        ratio = self.schedule(idx, n_layers, self.decay)
        keep = int(context * ratio)
        if idx % self.interval or context <= self.min_context or ratio >= 1 or keep <= self.min_context:
            return None
        score = self._scores(layer, query[:, :, -window:], scaling, slice(0, context))
        real = layer.valid[:, 0, :context]
        score = score.masked_fill(real & (real.cumsum(-1) <= self.sinks), math.inf).masked_fill(~real, -math.inf)
        chosen = score.topk(keep, dim=-1).indices.sort(-1).values
        recent = torch.arange(context, n, device=chosen.device).expand(chosen.shape[0], window)
        return torch.cat([chosen, recent], dim=-1)

    def observe(self, layer, query, scaling, prompt):
        if prompt:  # the prompt is handled by prompt_selection
            return
        window = layer.aux["recent_q"].shape[2]
        layer.aux["recent_q"] = torch.cat([layer.aux["recent_q"], query], dim=2)[:, :, -window:]
        start = int(layer.aux["compressed"][0])
        if layer.length - window - start < self.block:
            return
        # the `block` slots after the compressed part, scored by the recent queries; the rest stays
        span = slice(start, start + self.block)
        score = self._scores(layer, layer.aux["recent_q"], scaling, span)  # (B, block)
        ratio = self.schedule(layer.layer_idx, layer.n_layers, self.gen_decay)
        keep = max(int(self.block * self.gen_ratio * ratio), 1)
        chosen = score.masked_fill(~layer.valid[:, 0, span], -math.inf).topk(keep, -1).indices.sort(-1).values + start
        n = layer.length
        idx = torch.cat([torch.arange(start, device=chosen.device).expand(chosen.shape[0], start), chosen,
                         torch.arange(start + self.block, n, device=chosen.device).expand(chosen.shape[0], n - start - self.block)], -1)
        layer.keep(idx[:, None].expand(idx.shape[0], layer.keys.shape[1], idx.shape[1]))
        layer.aux["compressed"] = torch.full_like(layer.aux["compressed"], start + keep)
