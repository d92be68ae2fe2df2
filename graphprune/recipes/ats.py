"""ATS: Adaptive Token Sampler (Fayyaz et al., ECCV 2022), parameter-free.

In each sampling block (default: from ⌊L/4⌋ to the last, blocks 4-12 of DeiT-S as in the
official config), after the attention residual, tokens are scored by the class token's
attention (summed over heads) times the norm of their value vector, and ``capacity`` points
are sampled from the inverse CDF of the scores (:mod:`graphprune.ops.ats`). Repeated picks
count once, so each image keeps its own number of tokens. The graph has a fixed capacity:
slots past an image's count are padding, masked out of attention with ``log(size)``, skipped by
pooling and left out of later samplings, so each image keeps what the official code keeps with
``DROP_TOKENS`` run one image at a time (not its masked mode, whose CDF counts the padding).
The official DeiT-S config samples as many points as there are patch tokens (``capacity=1.0``,
which only removes repeated picks); smaller capacities bound the count and make the graph smaller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from graphprune.errors import ScheduleError
from graphprune.ops.ats import ats_capacity, ats_sample
from graphprune.passes.flow import TokenFlow
from graphprune.patterns import ModelGraph
from graphprune.recipes.base import Recipe, option, register
from graphprune.recipes.options import parse_locations
from graphprune.recipes.scores import cls_attention_value_norm, has_class_token


def _sample(x, samples, protected, n, size, score_fn, *score_args):
    return ats_sample(x, score_fn(*score_args), samples, protected, n, size)


@register
@dataclass
class ATS(Recipe):
    name = "ats"
    summary = "sample tokens by the inverse CDF of class attention × value norm; each image keeps its own count"
    paper = "Adaptive Token Sampler For Efficient Vision Transformers (ECCV 2022)"
    zero = {"locations": []}

    capacity: Union[float, int] = option(0.5, "sample points per block, the most tokens kept: a fraction of the "
                                              "initial patch tokens (official config: 1.0) or a count")
    locations: Optional[list] = option(None, "block indices that sample (default: from L/4 to the last block)")

    def validate(self) -> None:
        c = self.capacity
        if isinstance(c, bool) or not isinstance(c, (int, float)) or c <= 0 or (isinstance(c, float) and c > 1):
            raise ScheduleError(f"ats capacity is a fraction in (0, 1] or a token count >= 1, got {c!r}")
        if self.locations is not None:
            parse_locations(self.locations, 10**6)

    def where(self, num_blocks: int) -> list[int]:
        if self.locations is None:
            return list(range(num_blocks // 4, num_blocks))
        return parse_locations(self.locations, num_blocks)

    def check(self, graph: ModelGraph) -> None:
        self.where(len(graph.blocks))

    def apply(self, graph: ModelGraph) -> list[int]:
        protected = graph.layout.prefix
        patches = graph.tokens - protected
        samples = max(1, round(self.capacity * patches)) if isinstance(self.capacity, float) else self.capacity
        where = set(self.where(len(graph.blocks)))
        flow = TokenFlow(graph, prop_attn=True, restore=self.restore_tokens)  # log(size): padding slots masked
        for block in flow.blocks():
            if block.index in where:
                n = flow.n
                score_fn, score_args = cls_attention_value_norm(block.site, has_cls=has_class_token(graph))
                # the sizes so far: padding from an earlier sampling stays out of the CDF
                flow.reduce(block, _sample, samples, protected, n, flow.size, score_fn, *score_args,
                            out_tokens=ats_capacity(n, samples, protected), drops=True)
        return flow.counts
