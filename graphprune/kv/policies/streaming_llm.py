"""StreamingLLM: Efficient Streaming Language Models with Attention Sinks (Xiao et al., ICLR 2024)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from graphprune.kv.policy import CachePolicy, KeyOverride
from graphprune.ops.rope import rotate
from graphprune.recipes.base import option, register


@register
@dataclass
class StreamingLLM(CachePolicy):
    name = "streaming_llm"
    summary = "keep the first tokens (attention sinks) and a window of the most recent ones"
    paper = "Efficient Streaming Language Models with Attention Sinks (ICLR 2024)"

    sinks: int = option(4, "initial tokens always kept (attention sinks)")
    rerotate: bool = option(True, "re-apply RoPE with positions inside the cache, as the paper does (False: keep "
                                  "the original positions)")

    def min_budget(self) -> int:
        return self.sinks + 1

    def min_budget_reason(self) -> str:
        return f"{self.sinks} sinks plus one recent token"

    def sink_tokens(self) -> int:
        return self.sinks

    def score(self, view):
        return view.positions.float()  # the newest go last

    def attention_keys(self, view):
        if not self.rerotate or view.inv_freq is None:
            return None
        # The cache holds the sinks and a window of consecutive positions. Inside the cache the window sits right
        # after the sinks, the new token last: window keys and the query move by the same shift, which leaves
        # their dot products unchanged, so only the sink keys need turning, by minus that shift.
        keys, pos, valid = view.keys, view.positions, view.valid
        sink = valid & (pos < self.sinks)
        shift = valid.sum(-1, keepdim=True) - 1 - view.newest()  # (B, Hkv, 1), ≤ 0
        k = min(self.sinks, keys.shape[2])
        idx = pos.masked_fill(~sink, torch.iinfo(pos.dtype).max).topk(k, dim=-1, largest=False).indices
        picked = keys.gather(2, idx[..., None].expand(*idx.shape, keys.shape[-1]))
        return KeyOverride(idx, rotate(picked, (-shift).expand_as(idx) * sink.gather(2, idx), view.inv_freq))
