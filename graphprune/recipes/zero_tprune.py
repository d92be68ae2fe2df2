"""Zero-TPrune: zero-shot token pruning on the attention graph (Wang et al., CVPR 2024), training-free.

At each location (default ⌊L/4⌋, ⌊L/2⌋, ⌊3L/4⌋), after the attention residual, a fraction
``keep`` of the unprotected tokens stays, pruned in the paper's I′ → S → I order: one
weighted-PageRank iteration on the attention graph (:mod:`graphprune.ops.pagerank`) ranks the
tokens (I′); the S-stage drops the ``similar`` share of the pruned tokens that are
near-duplicates (the less important half's best key cosine to the more important half); the
I-stage drops the rest by converged weighted-PageRank importance. Pruned tokens are dropped,
not merged.

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
from graphprune.ops.pagerank import attention_pagerank
from graphprune.passes.flow import TokenFlow
from graphprune.patterns import ModelGraph
from graphprune.recipes.base import Recipe, option, register
from graphprune.recipes.options import parse_keep, parse_locations
from graphprune.recipes.scores import attention_probs, has_class_token

PRUNE = torch.ops.graphprune.prune.default


def weighted_pagerank(probs, n: int, iterations: int, has_cls: bool, valid=None, v_min: float = 0.01, v_max: float = 0.7):
    """(B, N) importance from (B, H, N, N) attention probabilities over ``n`` tokens; ``valid`` (B, N) zeroes
    padded queries.

    The iteration starts where the class token weighs √N times the others. The heads are combined
    by their root mean square (the paper's "emphasizing informative region"), over the heads whose
    score variance lies in ``[v_min, v_max]`` (its variance-based head filter; measured here on
    N·s, whose mean is 1, and all heads when none passes).
    """
    start = [math.sqrt(n) if (has_cls and i == 0) else 1.0 for i in range(n)]
    s = attention_pagerank(probs, probs.new_tensor(start) / sum(start), iterations, valid)
    var = (s * n).var(dim=-1, unbiased=False)  # (B, H)
    ok = ((var >= v_min) & (var <= v_max)).to(s.dtype)
    ok = torch.where(ok.sum(dim=1, keepdim=True) > 0, ok, torch.ones_like(ok))
    return ((s * s * ok[..., None]).sum(dim=1) / ok.sum(dim=1, keepdim=True)).sqrt()


def similar_half(importance, metric, n: int, drop: int, protected: int, valid=None):
    """The S-stage: ``(B, N)`` bool, True for the ``drop`` tokens removed as near-duplicates.

    The unprotected tokens are split by importance: the less important half A, the more
    important half B. Each A token's similarity is its best cosine to B (``metric``: the keys);
    the ``drop`` most similar A tokens go. Padding (``valid`` False) goes first.
    """
    p = n - protected
    order = importance[:, protected:].argsort(dim=1, descending=True, stable=True) + protected
    b_idx, a_idx = order[:, : p - p // 2], order[:, p - p // 2 :]
    m = metric / metric.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    take = lambda idx: m.gather(1, idx[..., None].expand(-1, -1, m.shape[-1]))  # noqa: E731
    best = (take(a_idx) @ take(b_idx).transpose(1, 2)).amax(dim=-1)  # (B, |A|)
    if valid is not None:
        best = torch.where(valid.gather(1, a_idx), best, torch.full_like(best, math.inf))
    chosen = a_idx.gather(1, best.argsort(dim=1, descending=True, stable=True)[:, :drop])
    return torch.zeros_like(importance, dtype=torch.bool).scatter(1, chosen, torch.ones_like(chosen, dtype=torch.bool))


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
