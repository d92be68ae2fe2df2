"""PiToMe: Accelerating Transformers with Spectrum-Preserving Token Merging (Tran et al., NeurIPS 2024).

In every block, after the attention residual: ``r = floor(T − T·ratio)`` of the T non-protected
tokens merge. Each token's energy ``mean_j ELU(cos_ij − m_l)`` over the head-mean keys, with the
margin ``m_l = 0.75 − 0.75·l/L``, orders the tokens; in the first ⌈L/2⌉ blocks all tokens take part
in ToMe's bipartite matching along that order, in the later ones only the 2r highest-energy tokens
do (all r of their A half merge) and the others are protected. Size-weighted merges; no
proportional attention (as in the authors' timm/DeiT patch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from graphprune.errors import ScheduleError
from graphprune.ops.pitome import pitome_r
from graphprune.passes.flow import TokenFlow
from graphprune.patterns import ModelGraph
from graphprune.recipes.base import Recipe, option, register

PITOME = torch.ops.graphprune.pitome_merge.default


def _merge(x, size, k, r, protected, margin, all_pairs, valid):
    if size is None:
        size = torch.ones_like(x[..., :1])
    x, size, assign, rep = PITOME(x, size, k.mean(dim=1), r, protected, margin, all_pairs, valid)
    return x, assign, rep, size


@register
@dataclass
class PiToMe(Recipe):
    name = "pitome"
    summary = "merge the highest-energy (most redundant) tokens, protecting informative ones (energy-based ToMe)"
    paper = "Accelerating Transformers with Spectrum-Preserving Token Merging (NeurIPS 2024)"
    zero = {"ratio": 1.0}

    ratio: float = option(0.9125, "fraction of the tokens kept in each block: r = floor(T - T*ratio)")
    margin: float = option(0.75, "energy margin of the first block; it decreases linearly to margin/L")

    def validate(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0.5 <= self.ratio <= 1.0:
            raise ScheduleError(f"ratio must lie in [0.5, 1] (fraction of tokens kept per block), got {self.ratio!r}")

    def apply(self, graph: ModelGraph) -> list[int]:
        protected, depth = graph.layout.prefix, len(graph.blocks)
        flow = TokenFlow(graph, restore=self.restore_tokens)
        for block in flow.blocks():
            t = flow.n - protected
            all_pairs = block.index < math.ceil(depth / 2)
            r = pitome_r(flow.n, math.floor(t - t * self.ratio), protected, all_pairs)
            if r == 0:
                continue
            margin = self.margin - self.margin * block.index / depth
            flow.reduce(block, _merge, flow.size, block.site.k, r, protected, margin, all_pairs, flow.valid(block),
                        out_tokens=flow.n - r)
        return flow.counts
