"""Turbo: Informativity-Driven Acceleration Plug-In for Vision-Language Models (Ju, Wang et al., ECCV 2024).

As the authors' code (anakin-skywalker-Joseph/Turbo, ``Code-BLIP/turbo``; the definition in their supplementary):
ToMe's bipartite soft matching in every block, after attention and before the MLP, on the block's keys averaged over
heads, with the even tokens ranked by their *information degree* E = R − 30·α·A instead of their redundancy R alone:
R is a token's highest cosine similarity to the odd tokens (mutual redundancy), A the class token's attention to it in
this block (semantic value: mean over heads, with the size bias of proportional attention where that is on). The r
tokens with the highest E merge into their most similar odd token (size-weighted mean; sizes add up); the class token
(every prefix token here) never merges; a block whose input has fewer than ``min_tokens`` tokens merges nothing. The
factor 30 is the authors' code's (their BLIP scripts use α = 5; the paper writes E = R − α·A). Models without a class
token are refused: A is read from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from graphprune.errors import RecipeError, ScheduleError
from graphprune.ops import tome_effective_r
from graphprune.passes.flow import TokenFlow
from graphprune.patterns import ModelGraph
from graphprune.recipes.base import Recipe, option, register
from graphprune.recipes.options import parse_r
from graphprune.recipes.scores import has_class_token

TOME = torch.ops.graphprune.tome_merge.default
SEMANTIC_SCALE = 30.0  # the authors' code multiplies α by 30 (Code-BLIP/turbo/merge.py)


def _turbo_sdpa(x, size, q, k, weight: float, scale: float, boolean: bool, r: int, protected: int, valid, mask=None):
    """Fused attention: A from the class row of softmax(q·kᵀ·scale + mask), the mask the block's attention takes (with
    proportional attention it holds the size bias)."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    logits = (q[:, :, :1] @ k.transpose(-2, -1)) * scale
    if mask is not None:
        m = mask[..., :1, :]
        logits = logits.masked_fill(~m, float("-inf")) if boolean else logits + m
    return _merge(x, size, k, logits.softmax(dim=-1).mean(dim=(1, 2)), weight, r, protected, valid)


def _turbo_explicit(x, size, k, probs, weight: float, r: int, protected: int, valid):
    """An explicit softmax node (the size bias is already on its logits): A is its class row."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    return _merge(x, size, k, probs[:, :, 0, :].mean(dim=1), weight, r, protected, valid)


def _merge(x, size, k, semantic, weight: float, r: int, protected: int, valid):
    x, size, assign, rep = TOME(x, size, k.mean(dim=1), r, protected, valid, weight * semantic)
    return x, assign, rep, size


@register
@dataclass
class Turbo(Recipe):
    name = "turbo"
    summary = "merge the r least informative tokens in every block: redundancy minus α × the class token's attention"
    paper = "Turbo: Informativity-Driven Acceleration Plug-In for Vision-Language Models (ECCV 2024)"
    zero = {"r": 0}

    r: Union[int, tuple, list] = option(13, "tokens merged per block: an int, (r, inflection) for a ramp, or one r per block")
    alpha: float = option(5.0, "α: weight of the semantic value (the class token's attention) against the mutual "
                               "redundancy; the authors' code multiplies it by 30 (their scripts: 5)")
    min_tokens: int = option(40, "blocks whose input has fewer tokens merge nothing (the authors' r_threshold)")
    prop_attn: bool = option(True, "proportional attention: add log(token size) to the attention logits")

    def validate(self) -> None:
        parse_r(self.r, max(len(self.r), 2) if isinstance(self.r, list) else 2)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha < 0:
            raise ScheduleError(f"turbo alpha must be a number ≥ 0, got {self.alpha!r}")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise ScheduleError(f"turbo min_tokens must be an int ≥ 0, got {self.min_tokens!r}")

    def check(self, graph: ModelGraph) -> None:
        rs = parse_r(self.r, len(graph.blocks))
        if any(rs) and not has_class_token(graph):
            raise RecipeError("turbo reads each token's semantic value from the class token's attention, and this "
                              "model has no class token; use tome (redundancy alone) instead")

    def apply(self, graph: ModelGraph) -> list[int]:
        protected = graph.layout.prefix
        weight = SEMANTIC_SCALE * float(self.alpha)
        flow = TokenFlow(graph, prop_attn=self.prop_attn, restore=self.restore_tokens)
        for block, r in zip(flow.blocks(), parse_r(self.r, len(graph.blocks))):
            n, site = flow.n, block.site
            r = tome_effective_r(n, r, protected)
            if not r or n < self.min_tokens:
                continue
            valid = flow.valid(block)
            if site.kind == "explicit":
                flow.reduce(block, _turbo_explicit, flow.size, site.k, site.node, weight, r, protected, valid,
                            out_tokens=n - r)
            else:
                flow.reduce(block, _turbo_sdpa, flow.size, site.q, site.k, weight, site.scale(), site.mask_is_bool,
                            r, protected, valid, site.mask, out_tokens=n - r)
        return flow.counts
