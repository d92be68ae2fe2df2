"""Add a per-key bias to the attention logits (ToMe's proportional attention: + log(size))."""

from __future__ import annotations

import math

from torch.fx import Node

from graphprune.passes.emit import emit_before
from graphprune.patterns.attention import AttentionSite


def add_attention_bias(site: AttentionSite, bias: Node) -> None:
    """``bias`` broadcasts against the (B, H, Nq, Nk) logits, e.g. shape (B, 1, 1, Nk)."""
    node, graph = site.node, site.node.graph
    if site.kind == "sdpa":
        mask = site.mask
        if mask is not None:
            if site.mask_is_bool:  # True = attend
                bias = emit_before(graph, node, lambda m, b: b.masked_fill(~m, -math.inf), mask, bias)
            else:
                bias = emit_before(graph, node, lambda m, b: m + b, mask, bias)
        args = list(node.args[:3])
        kwargs = dict(node.kwargs)
        for i, name in enumerate(("attn_mask", "dropout_p", "is_causal"), start=3):
            if len(node.args) > i:
                kwargs[name] = node.args[i]
        kwargs["attn_mask"] = bias
        node.args, node.kwargs = tuple(args), kwargs
    else:
        logits = site.logits
        biased = emit_before(graph, node, lambda x, b: x + b, logits, bias)
        node.replace_input_with(logits, biased)
