"""TPS: Joint Token Pruning and Squeezing (Wei et al., CVPR 2023), in its training-free form.

At each location (default ⌊L/4⌋, ⌊L/2⌋, ⌊3L/4⌋: blocks 3, 6, 9 of 12) the tokens are ranked by
the class token's attention (EViT's score, as the paper suggests for a predictor-free variant;
the published dTPS learns DynamicViT's predictor instead), ``int(P · keep^(k+1))`` patch tokens
are kept at the k-th location (P: the initial patch count), and every pruned token is squeezed
into its most similar kept token (cosine of the tokens): host i becomes
``(e·x_i + Σ_j exp(cos_ij)·x_j) / (e + Σ_j exp(cos_ij))``. No proportional attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from graphprune.passes.flow import TokenFlow
from graphprune.patterns import ModelGraph
from graphprune.recipes.base import Recipe, option, register
from graphprune.recipes.options import location_keep_counts, parse_keep, parse_locations
from graphprune.recipes.scores import cls_attention, has_class_token

MERGE = torch.ops.graphprune.merge_nearest.default


def _squeeze(x, keep, protected, valid, score_fn, *score_args):
    out, size, assign, rep = MERGE(x, torch.ones_like(x[..., :1]), x, score_fn(*score_args), keep, protected, valid, "squeeze")
    return out, assign, rep


@register
@dataclass
class TPS(Recipe):
    name = "tps"
    summary = "prune by class attention and squeeze each pruned token into its most similar kept token"
    paper = "Joint Token Pruning and Squeezing Towards More Aggressive Compression of Vision Transformers (CVPR 2023)"
    zero = {"keep": 1.0}

    keep: float = option(0.7, "keep rate: int(patches · keep^(k+1)) tokens stay after the k-th location")
    locations: Optional[list] = option(None, "block indices where tokens are pruned and squeezed (default L/4, L/2, 3L/4)")

    def validate(self) -> None:
        parse_keep(self.keep)
        if self.locations is not None:
            parse_locations(self.locations, 10**6)

    def check(self, graph: ModelGraph) -> None:
        parse_locations(self.locations, len(graph.blocks))

    def apply(self, graph: ModelGraph) -> list[int]:
        protected = graph.layout.prefix
        where = parse_locations(self.locations, len(graph.blocks))
        counts = dict(zip(where, location_keep_counts(graph.tokens - protected, parse_keep(self.keep), len(where))))
        flow = TokenFlow(graph, restore=self.restore_tokens)
        for block in flow.blocks():
            keep = counts.get(block.index)
            if keep is None or keep >= flow.n - protected:
                continue
            score_fn, score_args = cls_attention(block.site, has_cls=has_class_token(graph))
            flow.reduce(block, _squeeze, keep, protected, flow.valid(block), score_fn, *score_args,
                        out_tokens=protected + keep, drops=True)
        return flow.counts
