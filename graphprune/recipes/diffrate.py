"""DiffRate: Differentiable Compression Rate for Efficient Vision Transformers (Chen et al., ICCV 2023).

In every block after the first, after the attention residual: tokens are sorted by the class
token's attention (head mean, with proportional attention applied), the tail beyond
``prune[i]`` is dropped, and the tail beyond ``merge[i]`` is merged into its most similar kept
token (cosine of the tokens; plain mean; the host's size grows by similarity × size).
Proportional attention is always on. The counts are learned once by DiffRate (weights
frozen); graphprune applies a given schedule (default: the released DeiT-S 2.9 GFLOPs one,
scaled to the model's token count and depth).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from graphprune.passes.flow import TokenFlow, compose_maps
from graphprune.patterns import ModelGraph
from graphprune.recipes.base import Recipe, option, register
from graphprune.recipes.options import parse_counts
from graphprune.recipes.scores import cls_attention, has_class_token

PRUNE = torch.ops.graphprune.prune.default
MERGE = torch.ops.graphprune.merge_nearest.default

# compression_rate.json of the official release, DeiT-S at 2.9 GFLOPs (tokens after each block, cls included)
DEIT_S_2_9G_PRUNE = [197, 196, 190, 168, 150, 139, 129, 117, 99, 78, 58, 3]
DEIT_S_2_9G_MERGE = [197, 194, 176, 156, 141, 133, 121, 107, 88, 64, 56, 3]


def _fractions(counts):
    return [c / 197 for c in counts]


def _diffrate(x, size, prune_keep, merge_keep, protected, valid, score_fn, *score_args):
    """Prune to ``prune_keep`` then merge to ``merge_keep`` (non-protected tokens), ranked by class attention."""
    score = score_fn(*score_args)
    if size is None:
        size = torch.ones_like(x[..., :1])
    maps = None
    if prune_keep is not None:
        x, assign, rep = PRUNE(x, score, prune_keep, protected)
        maps = (assign, rep)
        score, size = score.gather(1, rep), size.gather(1, rep[..., None])
        valid = None if valid is None else valid.gather(1, rep)
    if merge_keep is not None:
        x, size, assign, rep = MERGE(x, size, x, score, merge_keep, protected, valid, "mean")
        maps = (assign, rep) if maps is None else compose_maps(maps, (assign, rep))
    return x, maps[0], maps[1], size


@register
@dataclass
class DiffRate(Recipe):
    name = "diffrate"
    summary = "sort by class attention, prune the tail, merge the next tail into similar kept tokens (per-block counts)"
    paper = "DiffRate: Differentiable Compression Rate for Efficient Vision Transformers (ICCV 2023)"
    zero = {"prune": [1.0], "merge": [1.0]}

    prune: Optional[list] = option(None, "tokens left after pruning in each block (ints, or fractions of the tokens); default: the released DeiT-S 2.9G schedule")
    merge: Optional[list] = option(None, "tokens left after merging in each block (ints or fractions); default: the released DeiT-S 2.9G schedule")

    def validate(self) -> None:
        for what, v in (("prune", self.prune), ("merge", self.merge)):
            if v is not None:
                parse_counts(v, len(v), 10**6, 0, what)

    def schedule(self, graph: ModelGraph) -> tuple[list[int], list[int]]:
        n, p, depth = graph.tokens, graph.layout.prefix, len(graph.blocks)
        prune = parse_counts(self.prune or _fractions(DEIT_S_2_9G_PRUNE), depth, n, p, "prune")
        merge = parse_counts(self.merge or _fractions(DEIT_S_2_9G_MERGE), depth, n, p, "merge")
        return prune, [min(m, q) for m, q in zip(merge, prune)]

    def check(self, graph: ModelGraph) -> None:
        self.schedule(graph)

    def apply(self, graph: ModelGraph) -> list[int]:
        protected = graph.layout.prefix
        prune, merge = self.schedule(graph)
        flow = TokenFlow(graph, prop_attn=True, restore=self.restore_tokens)
        for block in flow.blocks():
            if block.index == 0:
                continue  # DiffRate never compresses the first block
            p, m = prune[block.index], merge[block.index]
            if m >= flow.n:
                continue
            score_fn, score_args = cls_attention(block.site, has_cls=has_class_token(graph))
            prune_keep = p - protected if p < flow.n else None
            merge_keep = m - protected if m < p else None
            flow.reduce(block, _diffrate, flow.size, prune_keep, merge_keep, protected, flow.valid(block), score_fn, *score_args,
                        out_tokens=m, drops=True)
        return flow.counts
