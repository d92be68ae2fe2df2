"""Zero-TPrune: zero-shot token pruning on the attention graph (Wang et al., CVPR 2024), training-free.

At each location (default ⌊L/4⌋, ⌊L/2⌋, ⌊3L/4⌋), after the attention residual, a fraction
``keep`` of the unprotected tokens stays, pruned in the paper's I′ → S → I order
(:mod:`graphprune.ops.pagerank`): one weighted-PageRank iteration ranks the tokens (I′); the
S-stage drops the ``similar`` share of the pruned tokens that are near-duplicates (the less
important half's best key cosine to the more important half); the I-stage drops the rest by
converged weighted-PageRank importance. Pruned tokens are dropped, not merged.

From the paper as summarised (no official code was reachable): the iteration counts follow
its convergence ablation (30 in the first third of the model, 10 in the middle, 1 in the last
third); the counts per location and the S/I split are ours (the paper's DeiT-S schedule is in
its appendix), and the I-stage ranks with the attention of all the layer's tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from graphprune.errors import ScheduleError
from graphprune.ops.evit import evit_keep_count
from graphprune.ops.pagerank import similar_half, weighted_pagerank
from graphprune.passes.flow import TokenFlow
from graphprune.patterns import ModelGraph
from graphprune.recipes.base import Recipe, option, register
from graphprune.recipes.options import parse_keep, parse_locations
from graphprune.recipes.scores import attention_probs, has_class_token

PRUNE = torch.ops.graphprune.prune.default


def default_iterations(index: int, num_blocks: int) -> int:
    third = 3 * index // num_blocks
    return (30, 10, 1)[min(third, 2)]


def _prune(x, keep, protected, n, iterations, has_cls, drop_similar, valid, k, probs_fn, *probs_args):
    probs = probs_fn(*probs_args)
    rough = weighted_pagerank(probs, n, 1, has_cls, valid)
    importance = weighted_pagerank(probs, n, iterations, has_cls, valid)
    if drop_similar:
        gone = similar_half(rough, k.mean(dim=1), n, drop_similar, protected, valid)
        importance = importance.masked_fill(gone, -math.inf)
    out, assign, rep = PRUNE(x, importance, keep, protected)
    return out, assign, rep


@register
@dataclass
class ZeroTPrune(Recipe):
    name = "zero_tprune"
    summary = "prune near-duplicate tokens, then the least important by weighted PageRank on the attention graph"
    paper = "Zero-TPrune: Zero-Shot Token Pruning through Leveraging of the Attention Graph (CVPR 2024)"
    zero = {"keep": 1.0}

    keep: float = option(0.7, "fraction of the (unprotected) tokens kept at each location")
    similar: float = option(0.5, "share of each location's pruned tokens removed as near-duplicates (S-stage)")
    locations: Optional[list] = option(None, "block indices where tokens are pruned (default L/4, L/2, 3L/4)")

    def validate(self) -> None:
        parse_keep(self.keep)
        if isinstance(self.similar, bool) or not isinstance(self.similar, (int, float)) or not 0 <= self.similar <= 1:
            raise ScheduleError(f"zero_tprune similar is a share in [0, 1], got {self.similar!r}")
        if self.locations is not None:
            parse_locations(self.locations, 10**6)

    def check(self, graph: ModelGraph) -> None:
        parse_locations(self.locations, len(graph.blocks))

    def apply(self, graph: ModelGraph) -> list[int]:
        keep, protected, num_blocks = parse_keep(self.keep), graph.layout.prefix, len(graph.blocks)
        where = set(parse_locations(self.locations, num_blocks))
        flow = TokenFlow(graph, restore=self.restore_tokens)
        for block in flow.blocks():
            n = flow.n
            n_out = protected + evit_keep_count(n, keep, protected)  # ceil(keep · unprotected), as EViT
            if block.index in where and n_out < n:
                drop_similar = round(self.similar * (n - n_out))
                probs_fn, probs_args = attention_probs(block.site)
                flow.reduce(block, _prune, n_out - protected, protected, n, default_iterations(block.index, num_blocks),
                            has_class_token(graph), drop_similar, flow.valid(block), block.site.k, probs_fn, *probs_args,
                            out_tokens=n_out, drops=True)
        return flow.counts
