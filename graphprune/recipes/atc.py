"""ATC: Agglomerative Token Clustering (Haurum et al., ECCV 2024), training-free.

At each location (default ⌊L/4⌋, ⌊L/2⌋, ⌊3L/4⌋: blocks 4, 7, 10 of DeiT-S, as in the
paper), after the attention residual, the unprotected tokens are clustered into
``int(P · keep^(k+1))`` clusters at the k-th location (P: the initial patch count) by
agglomerative clustering on ``1 − cosine`` of the head-averaged keys, and each cluster
becomes one token (size-weighted mean) with proportional attention afterwards. The batched
in-graph clustering (:mod:`graphprune.ops.cluster`) is the exact greedy algorithm of the
scikit-learn call in the official code, so it gives the same clusters up to ties.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from graphprune.errors import ScheduleError
from graphprune.ops.cluster import LINKAGES, agglomerative_merge
from graphprune.passes.flow import TokenFlow
from graphprune.patterns import ModelGraph
from graphprune.recipes.base import Recipe, option, register
from graphprune.recipes.options import location_keep_counts, parse_keep, parse_locations


def _cluster(x, size, k, clusters, protected, n, linkage, valid):
    if size is None:
        size = torch.ones_like(x[..., :1])
    x, size, assign, rep = agglomerative_merge(x, size, k.mean(dim=1), clusters, protected, n, linkage, valid)
    return x, assign, rep, size


@register
@dataclass
class ATC(Recipe):
    name = "atc"
    summary = "cluster tokens agglomeratively on key similarity and merge each cluster into one token"
    paper = "Agglomerative Token Clustering (ECCV 2024)"
    zero = {"keep": 1.0}

    keep: float = option(0.7, "keep rate: int(patches · keep^(k+1)) clusters after the k-th location")
    linkage: str = option("average", "cluster distance: 'average' (the official default), 'complete' or 'single'")
    locations: Optional[list] = option(None, "block indices where tokens are clustered (default L/4, L/2, 3L/4)")
    prop_attn: bool = option(True, "proportional attention: add log(cluster size) to the attention logits")

    def validate(self) -> None:
        parse_keep(self.keep)
        if self.linkage not in LINKAGES:
            raise ScheduleError(f"atc linkage must be one of {', '.join(LINKAGES)}, got {self.linkage!r}")
        if self.locations is not None:
            parse_locations(self.locations, 10**6)

    def check(self, graph: ModelGraph) -> None:
        parse_locations(self.locations, len(graph.blocks))

    def apply(self, graph: ModelGraph) -> list[int]:
        protected = graph.layout.prefix
        where = parse_locations(self.locations, len(graph.blocks))
        counts = dict(zip(where, location_keep_counts(graph.tokens - protected, parse_keep(self.keep), len(where))))
        flow = TokenFlow(graph, prop_attn=self.prop_attn, restore=self.restore_tokens)
        for block in flow.blocks():
            clusters, n = counts.get(block.index), flow.n
            if clusters is None or clusters >= n - protected:
                continue
            flow.reduce(block, _cluster, flow.size, block.site.k, clusters, protected, n, self.linkage, flow.valid(block),
                        out_tokens=protected + clusters)
        return flow.counts
