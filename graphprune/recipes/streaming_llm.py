"""StreamingLLM: Efficient Streaming Language Models with Attention Sinks (Xiao et al., ICLR 2024)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from graphprune.ops.rope import rotate
from graphprune.recipes.base import option, register
from graphprune.recipes.cache import CacheRecipe


@register
@dataclass
class StreamingLLM(CacheRecipe):
    name = "streaming_llm"
    summary = "keep the first tokens (attention sinks) and a window of the most recent ones"
    paper = "Efficient Streaming Language Models with Attention Sinks (ICLR 2024)"
    ring = True

    sinks: int = option(4, "initial tokens always kept (attention sinks)")
    rerotate: bool = option(True, "re-apply RoPE with positions inside the cache, as the paper does (False: keep "
                                  "the original positions)")

    def min_budget(self) -> int:
        return self.sinks + 1

    def min_budget_reason(self) -> str:
        return f"{self.sinks} sinks plus one recent token"

    def attention_inputs(self, layer, query, keys):
        if not self.rerotate or layer.inv_freq is None:
            return query, keys
        # The cache holds the sinks and a window of consecutive positions. Inside the cache the window sits right
        # after the sinks, the new token last: window keys and the query move by the same shift, which leaves
        # their dot products unchanged, so only the sink keys need turning, by minus that shift.
        sink = layer.valid & (layer.pos < self.sinks)
        shift = layer.valid.sum(-1, keepdim=True) - 1 - layer.newest()  # (B, Hkv, 1), ≤ 0
        k = min(self.sinks, keys.shape[2])
        idx = layer.pos.masked_fill(~sink, torch.iinfo(layer.pos.dtype).max).topk(k, dim=-1, largest=False).indices
        picked = keys.gather(2, idx[..., None].expand(*idx.shape, keys.shape[-1]))
        turned = rotate(picked, (-shift).expand_as(idx) * sink.gather(2, idx), layer.inv_freq)
        return query, keys.scatter(2, idx[..., None].expand_as(picked), turned)

    def select(self, layer, query, scaling, capacity):
        sinks = layer.valid & (layer.pos < self.sinks)  # positions count real tokens from 0
        return layer.top(layer.pos.float(), capacity, protect=sinks)
