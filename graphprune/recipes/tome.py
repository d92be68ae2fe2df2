"""ToMe: Token Merging (Bolya et al., ICLR 2023), training-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from graphprune.ops import tome_effective_r
from graphprune.passes import add_attention_bias, emit, reduce_after_residual, size_weighted_pooling
from graphprune.patterns import ModelGraph
from graphprune.recipes.base import Recipe, option, register
from graphprune.schedule import parse_r

TOME = torch.ops.graphprune.tome_merge.default


def _merge(x, size, k, r, protected):
    if size is None:
        size = torch.ones_like(x[..., :1])
    out = TOME(x, size, k.mean(dim=1), r, protected)
    return out[0], out[1]


def _log_size_bias(size):
    return size[..., 0].log()[:, None, None, :]


@register
@dataclass
class ToMe(Recipe):
    name = "tome"
    summary = "merge the r most similar tokens in every block (bipartite soft matching on attention keys)"
    paper = "Token Merging: Your ViT But Faster (ICLR 2023)"

    r: Union[int, tuple, list] = option(13, "tokens merged per block: an int, (r, inflection) for a ramp, or one r per block")
    prop_attn: bool = option(True, "proportional attention: add log(token size) to the attention logits")

    def validate(self) -> None:
        """Check the option's form before capture; the block count is checked by ``check``."""
        parse_r(self.r, max(len(self.r), 2) if isinstance(self.r, list) else 2)

    def check(self, graph: ModelGraph) -> None:
        parse_r(self.r, len(graph.blocks))

    def schedule(self, num_blocks: int) -> list[int]:
        return parse_r(self.r, num_blocks)

    def apply(self, graph: ModelGraph) -> list[int]:
        protected = graph.layout.prefix
        rs = self.schedule(len(graph.blocks))
        n, size, bias, counts = graph.tokens, None, None, []
        for block, r in zip(graph.blocks, rs):
            counts.append(n)
            if bias is not None:
                add_attention_bias(block.site, bias)
            r = tome_effective_r(n, r, protected)
            if r == 0:
                continue
            merged = reduce_after_residual(block, _merge, size, block.site.k, r, protected)
            size = merged[1]
            if self.prop_attn:
                bias = emit(size.graph, size, _log_size_bias, size)
            n -= r
        if size is not None:
            size_weighted_pooling(graph.layout, size)
        return counts
