"""StreamingLLM: Efficient Streaming Language Models with Attention Sinks (Xiao et al., ICLR 2024)."""

from __future__ import annotations

from dataclasses import dataclass

from graphprune.kv.cache import rotate
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
        slot = layer.rank()  # position inside the cache (real tokens only)
        keys = rotate(keys, slot - layer.pos, layer.inv_freq)
        n_new, groups = query.shape[2], query.shape[1] // keys.shape[1]
        shift = (slot - layer.pos)[..., -n_new:].repeat_interleave(groups, dim=1)
        return rotate(query, shift, layer.inv_freq), keys

    def select(self, layer, query, scaling, capacity):
        sinks = layer.valid & (layer.pos < self.sinks)  # positions count real tokens from 0
        return layer.top(layer.pos.float(), capacity, protect=sinks)
