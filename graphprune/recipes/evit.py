"""EViT: Expediting Vision Transformers via Token Reorganizations (Liang et al., ICLR 2022)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from graphprune.ops.evit import evit_out_tokens
from graphprune.patterns import AttentionSite, ModelGraph
from graphprune.recipes.base import Recipe, option, register
from graphprune.passes.flow import TokenFlow
from graphprune.schedule import parse_keep, parse_locations

EVIT = torch.ops.graphprune.evit_select.default


def cls_attention(site: AttentionSite, has_cls: bool = True):
    """A function of the site's nodes giving each token's importance, (B, N).

    With a class token: the class token's attention to every token, from the class row only
    (softmax(q_cls · kᵀ · scale)), so this works with fused attention that never materialises
    the matrix. Without one (e.g. SigLIP): the attention each token receives, averaged over
    all queries and heads, which needs the full matrix at this block.
    """
    if site.kind == "explicit":
        if has_cls:
            return lambda probs: probs[:, :, 0, :].mean(dim=1), (site.node,)
        return lambda probs: probs.mean(dim=(1, 2)), (site.node,)
    scale = site.scale()

    boolean = site.mask is not None and site.mask.meta["val"].dtype == torch.bool

    def score(q, k, mask=None):
        rows = q[:, :, :1] if has_cls else q
        logits = (rows @ k.transpose(-2, -1)) * scale
        if mask is not None:
            m = mask[..., :1, :] if has_cls else mask
            logits = logits.masked_fill(~m, float("-inf")) if boolean else logits + m
        return logits.softmax(dim=-1).mean(dim=(1, 2))

    return score, (site.q, site.k) + ((site.mask,) if site.mask is not None else ())


def _select(x, keep, protected, score_fn, *score_args):
    out, assign, rep = EVIT(x, score_fn(*score_args), keep, protected)
    return out, assign, rep


@register
@dataclass
class EViT(Recipe):
    name = "evit"
    summary = "keep the tokens the class token attends to most, fuse the rest into one token"
    paper = "EViT: Expediting Vision Transformers via Token Reorganizations (ICLR 2022)"

    keep: float = option(0.7, "fraction of (non-protected) tokens kept at each location")
    locations: Optional[list] = option(None, "block indices where tokens are reorganised (default L/4, L/2, 3L/4)")

    def validate(self) -> None:
        parse_keep(self.keep)
        if self.locations is not None:
            parse_locations(self.locations, 10**6)

    def check(self, graph: ModelGraph) -> None:
        parse_locations(self.locations, len(graph.blocks))

    def apply(self, graph: ModelGraph) -> list[int]:
        keep, protected = parse_keep(self.keep), graph.layout.prefix
        where = set(parse_locations(self.locations, len(graph.blocks)))
        flow = TokenFlow(graph, restore=self.restore_tokens)
        for block in flow.blocks():
            n_out = evit_out_tokens(flow.n, keep, protected)
            if block.index in where and n_out != flow.n:
                score_fn, score_args = cls_attention(block.site, has_cls=graph.layout.roles[:1] in (["cls"], ["prefix"]))
                flow.reduce(block, _select, keep, protected, score_fn, *score_args, out_tokens=n_out)
        return flow.counts
