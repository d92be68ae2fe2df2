"""PPT: Token Pruning and Pooling for Efficient Vision Transformers (Wu et al., 2023), training-free.

At each location (default ⌊L/4⌋, ⌊L/2⌋, ⌊3L/4⌋), every image chooses: when its token
significance (class attention × ‖v‖, normalised over the patch tokens) has a variance below
``threshold`` the tokens are alike and it *pools* (ToMe's bipartite merge of r tokens); otherwise
it *prunes* the r least significant tokens (the kept ones in descending significance). Both
branches leave N − r tokens, so shapes stay static: both run and each image takes its own.
Sizes are tracked and proportional attention is on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from graphprune.ops import tome_effective_r
from graphprune.passes.flow import TokenFlow
from graphprune.patterns import ModelGraph
from graphprune.recipes.base import Recipe, option, register
from graphprune.recipes.options import parse_locations, parse_r
from graphprune.recipes.scores import cls_attention_value_norm, has_class_token

TOME = torch.ops.graphprune.tome_merge.default
PRUNE = torch.ops.graphprune.prune.default


def _ppt(x, size, keys, r, protected, threshold, valid, score_fn, *score_args):
    if size is None:
        size = torch.ones_like(x[..., :1])
    score = score_fn(*score_args)
    patch = score[:, protected:]
    patch = patch / patch.sum(dim=1, keepdim=True)
    pool = (patch.var(dim=1) < threshold)[:, None]  # (B, 1): this image pools
    px, psize, passign, prep = TOME(x, size, keys.mean(dim=1), r, protected, valid)
    kx, kassign, krep = PRUNE(x, score, x.shape[1] - protected - r, protected)
    ksize = size.gather(1, krep[..., None])
    tokens = pool[..., None]
    return (torch.where(tokens, px, kx), torch.where(pool, passign, kassign), torch.where(pool, prep, krep),
            torch.where(tokens, psize, ksize))


@register
@dataclass
class PPT(Recipe):
    name = "ppt"
    summary = "per image, pool (merge) alike tokens or prune insignificant ones, decided by the variance of significance"
    paper = "PPT: Token Pruning and Pooling for Efficient Vision Transformers (2023)"
    zero = {"r": 0}

    r: int = option(50, "tokens removed at each location (capped at half of the non-protected tokens)")
    locations: Optional[list] = option(None, "block indices where tokens are pooled or pruned (default L/4, L/2, 3L/4)")
    threshold: float = option(7e-5, "pool when the variance of the normalised significance is below this")

    def validate(self) -> None:
        parse_r(self.r, 2)
        if self.locations is not None:
            parse_locations(self.locations, 10**6)

    def check(self, graph: ModelGraph) -> None:
        parse_locations(self.locations, len(graph.blocks))

    def apply(self, graph: ModelGraph) -> list[int]:
        protected = graph.layout.prefix
        where = set(parse_locations(self.locations, len(graph.blocks)))
        flow = TokenFlow(graph, prop_attn=True, restore=self.restore_tokens)
        for block in flow.blocks():
            r = tome_effective_r(flow.n, self.r, protected)
            if block.index not in where or r == 0:
                continue
            score_fn, score_args = cls_attention_value_norm(block.site, has_cls=has_class_token(graph))
            flow.reduce(block, _ppt, flow.size, block.site.k, r, protected, self.threshold, flow.valid(block), score_fn, *score_args,
                        out_tokens=flow.n - r, drops=True)
        return flow.counts
