"""EViT: Expediting Vision Transformers via Token Reorganizations (Liang et al., ICLR 2022)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from graphprune.ops.evit import evit_out_tokens
from graphprune.passes.flow import TokenFlow
from graphprune.patterns import ModelGraph
from graphprune.recipes.base import Recipe, option, register
from graphprune.recipes.options import parse_keep, parse_locations
from graphprune.recipes.scores import cls_attention, has_class_token

EVIT = torch.ops.graphprune.evit_select.default


def _select(x, keep, protected, score_fn, *score_args):
    out, assign, rep = EVIT(x, score_fn(*score_args), keep, protected)
    return out, assign, rep


@register
@dataclass
class EViT(Recipe):
    name = "evit"
    summary = "keep the tokens the class token attends to most, fuse the rest into one token"
    paper = "EViT: Expediting Vision Transformers via Token Reorganizations (ICLR 2022)"
    zero = {"keep": 1.0}

    keep: float = option(0.7, "fraction of (non-protected) tokens kept at each location")
    locations: Optional[list] = option(None, "block indices where tokens are reorganised (default L/4, L/2, 3L/4)")

    def validate(self) -> None:
        parse_keep(self.keep)
        if self.locations is not None:
            parse_locations(self.locations, 10**6)

    def check(self, graph: ModelGraph) -> None:
        parse_locations(self.locations, len(graph.blocks))

    def apply(self, graph: ModelGraph) -> list[int]:
        keep, protected = parse_keep(self.keep), graph.layout.prefix
        where = set(parse_locations(self.locations, len(graph.blocks)))
        flow = TokenFlow(graph, restore=self.restore_tokens)
        for block in flow.blocks():
            n_out = evit_out_tokens(flow.n, keep, protected)
            if block.index in where and n_out != flow.n:
                score_fn, score_args = cls_attention(block.site, has_cls=has_class_token(graph))
                flow.reduce(block, _select, keep, protected, score_fn, *score_args, out_tokens=n_out)
        return flow.counts
