"""ToMe: Token Merging (Bolya et al., ICLR 2023), training-free.

``split`` picks the bipartite partition of the published code: ``alternate`` (the default,
A = even and B = odd positions, the r best-matched A tokens merge), ``random``
(``random_bipartite_soft_matching``: A = r random tokens, every one merges into its most
similar B token) or ``kth`` (``kth_bipartite_soft_matching``: B = every k-th token, the r
best-matched A tokens merge; r ≥ |A| merges all of A, N → N/k). Differences from the
published helpers: the prefix tokens (class, registers) are protected, the random draw is
made once per block when the model is optimized (from ``seed``, so the graph is
deterministic and exports), and with ``kth`` the N mod k trailing tokens are sources like
the others instead of being dropped.

``metric`` picks the features compared: ``keys`` (the published choice: the block's attention
keys averaged over heads), ``keys_concat`` (each head's keys L2-normalised, heads concatenated)
or ``tokens`` (the tokens themselves at the merge point, after attention). The paper chose keys on
ViTs; on a sentence encoder (all-MiniLM-L6-v2) the head-averaged keys are a poor similarity
and ``tokens`` keeps far more fidelity at the same r (docs/real_weights.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from graphprune.errors import ScheduleError
from graphprune.ops import tome_effective_r
from graphprune.ops.bipartite import bipartite_merge, kth_split, random_split
from graphprune.passes.flow import TokenFlow
from graphprune.patterns import ModelGraph
from graphprune.recipes.base import Recipe, option, register
from graphprune.recipes.options import parse_r

TOME = torch.ops.graphprune.tome_merge.default


METRICS = {  # the features whose cosine similarity decides the merges: (tokens x (B, N, C), keys k (B, H, N, d)) -> (B, N, D)
    "keys": lambda x, k: k.mean(dim=1),
    "keys_concat": lambda x, k: torch.nn.functional.normalize(k, dim=-1).transpose(1, 2).flatten(2),
    "tokens": lambda x, k: x,
}


def _merge(x, size, k, metric, r, protected, valid):
    if size is None:
        size = torch.ones_like(x[..., :1])
    x, size, assign, rep = TOME(x, size, METRICS[metric](x, k), r, protected, valid)
    return x, assign, rep, size


def _bipartite(x, size, k, metric, src, dst, r, protected, valid):
    if size is None:
        size = torch.ones_like(x[..., :1])
    x, size, assign, rep = bipartite_merge(x, size, METRICS[metric](x, k), src, dst, r, protected, valid)
    return x, assign, rep, size


SPLITS = ("alternate", "random", "kth")


@register
@dataclass
class ToMe(Recipe):
    name = "tome"
    summary = "merge the r most similar tokens in every block (bipartite soft matching on attention keys)"
    paper = "Token Merging: Your ViT But Faster (ICLR 2023)"
    zero = {"r": 0}

    r: Union[int, tuple, list] = option(13, "tokens merged per block: an int, (r, inflection) for a ramp, or one r per block")
    prop_attn: bool = option(True, "proportional attention: add log(token size) to the attention logits")
    split: str = option("alternate", "bipartite partition: 'alternate' (published default), 'random' (r random "
                        "tokens merge into the rest) or 'kth' (every k-th token is a destination)")
    k: int = option(2, "with split='kth': every k-th token is a destination (k >= 2)")
    seed: int = option(0, "with split='random': seed of the per-block random draw")
    metric: str = option("keys", "similarity features: 'keys' (published: attention keys averaged over heads), "
                         "'keys_concat' (per-head normalised keys, concatenated) or 'tokens' (the tokens after attention; "
                         "better on sentence encoders)")

    def validate(self) -> None:
        """Check the option's form before capture; the block count is checked by ``check``."""
        parse_r(self.r, max(len(self.r), 2) if isinstance(self.r, list) else 2)
        if self.split not in SPLITS:
            raise ScheduleError(f"tome split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if not isinstance(self.k, int) or self.k < 2:
            raise ScheduleError(f"tome k must be an integer >= 2 (every k-th token is a destination), got {self.k!r}")
        if self.metric not in METRICS:
            raise ScheduleError(f"tome metric must be one of {', '.join(METRICS)}, got {self.metric!r}")

    def _step(self, flow: TokenFlow, block, r: int, protected: int, valid) -> None:
        n = flow.n
        if self.split == "alternate":  # the op clips r to the tokens it gets (the same r here; less on shorter calls)
            merged = tome_effective_r(n, r, protected)
            if merged:
                flow.reduce(block, _merge, flow.size, block.site.k, self.metric, r, protected, valid,
                            out_tokens=n - merged)
            return
        if self.split == "random":
            src, dst = random_split(n, protected, min(r, n - protected - 1), self.seed * 100003 + block.index)
            r = len(src)
        else:
            src, dst = kth_split(n, protected, self.k)
            r = min(r, len(src))
        if r > 0 and dst:
            flow.reduce(block, _bipartite, flow.size, block.site.k, self.metric, src, dst, r, protected, valid, out_tokens=n - r,
                        drops=valid is not None)

    def any_length(self) -> bool:
        return self.split == "alternate"  # the other splits fix their token sets by position when optimized

    def check(self, graph: ModelGraph) -> None:
        parse_r(self.r, len(graph.blocks))

    def schedule(self, num_blocks: int) -> list[int]:
        return parse_r(self.r, num_blocks)

    def apply(self, graph: ModelGraph) -> list[int]:
        protected = graph.layout.prefix
        flow = TokenFlow(graph, prop_attn=self.prop_attn, restore=self.restore_tokens)
        for block, r in zip(flow.blocks(), self.schedule(len(graph.blocks))):
            self._step(flow, block, r, protected, flow.valid(block))
        return flow.counts
