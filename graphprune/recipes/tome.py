"""ToMe: Token Merging (Bolya et al., ICLR 2023), training-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from graphprune.ops import tome_effective_r
from graphprune.passes.flow import TokenFlow
from graphprune.patterns import ModelGraph
from graphprune.recipes.base import Recipe, option, register
from graphprune.schedule import parse_r

TOME = torch.ops.graphprune.tome_merge.default


def _merge(x, size, k, r, protected, valid):
    if size is None:
        size = torch.ones_like(x[..., :1])
    x, size, assign, rep = TOME(x, size, k.mean(dim=1), r, protected, valid)
    return x, assign, rep, size


@register
@dataclass
class ToMe(Recipe):
    name = "tome"
    summary = "merge the r most similar tokens in every block (bipartite soft matching on attention keys)"
    paper = "Token Merging: Your ViT But Faster (ICLR 2023)"
    zero = {"r": 0}

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
        flow = TokenFlow(graph, prop_attn=self.prop_attn, restore=self.restore_tokens)
        for block, r in zip(flow.blocks(), self.schedule(len(graph.blocks))):
            r = tome_effective_r(flow.n, r, protected)
            if r:
                flow.reduce(block, _merge, flow.size, block.site.k, r, protected, flow.valid(block), out_tokens=flow.n - r)
        return flow.counts
