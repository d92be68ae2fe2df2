"""Add a per-key bias to the attention logits (ToMe's proportional attention: + log(size))."""

from __future__ import annotations

from torch.fx import Node

import torch

from graphprune.passes.emit import emit_before
from graphprune.patterns.attention import AttentionSite

aten = torch.ops.aten


def _pin_layout(node: Node) -> None:
    """Make the reshape of a masked attention output explicit about memory layout.

    A masked SDPA's traced output layout differs from its decomposed one; the ONNX exporter
    then turns the model's later ``transpose → reshape`` into a view that is invalid for the
    other layout. A contiguous clone right before the reshape is correct for both (a plain
    ``contiguous()`` is dropped by export when the traced layout makes it look like a no-op).
    """
    for user in list(node.users):
        if user.target in (aten.transpose.int, aten.permute.default):
            _pin_layout(user)
        elif user.target in (aten.reshape.default, aten.view.default):
            pinned = emit_before(node.graph, user, lambda t: t.clone(memory_format=torch.contiguous_format), node)
            user.replace_input_with(node, pinned)


def add_attention_bias(site: AttentionSite, bias: Node) -> None:
    """``bias`` broadcasts against the (B, H, Nq, Nk) logits, e.g. shape (B, 1, 1, Nk)."""
    node, graph = site.node, site.node.graph
    if site.kind == "sdpa":
        mask = site.mask
        if mask is not None:
            if mask.meta["val"].dtype.is_floating_point is False:
                raise NotImplementedError("boolean attention masks with proportional attention")
            bias = emit_before(graph, node, lambda m, b: m + b, mask, bias)
        args = list(node.args[:3])
        kwargs = dict(node.kwargs)
        for i, name in enumerate(("attn_mask", "dropout_p", "is_causal"), start=3):
            if len(node.args) > i:
                kwargs[name] = node.args[i]
        kwargs["attn_mask"] = bias
        node.args, node.kwargs = tuple(args), kwargs
        _pin_layout(node)
    else:
        logits = site.logits
        biased = emit_before(graph, node, lambda x, b: x + b, logits, bias)
        node.replace_input_with(logits, biased)
