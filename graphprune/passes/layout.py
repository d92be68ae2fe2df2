"""Pin the memory layout of masked attention outputs before ONNX export."""

from __future__ import annotations

import copy

import torch
from torch.fx import Node

from graphprune.passes.emit import emit_before
from graphprune.patterns.attention import SDPA

aten = torch.ops.aten


def _pin(node: Node) -> None:
    for user in list(node.users):
        if user.target in (aten.transpose.int, aten.permute.default):
            _pin(user)
        elif user.target in (aten.reshape.default, aten.view.default):
            pinned = emit_before(node.graph, user, lambda t: t.clone(memory_format=torch.contiguous_format), node)
            user.replace_input_with(node, pinned)


def pin_attention_layout(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm`` (parameters shared) where masked attention outputs are made contiguous before reshaping.

    A masked SDPA's traced output layout differs from its decomposed one; the ONNX exporter
    then turns the model's later ``transpose → reshape`` into a view that is invalid for the
    other layout. A contiguous clone right before the reshape is correct for both (a plain
    ``contiguous()`` is dropped by export when the traced layout makes it look like a no-op).
    Eager execution does not need it, so only the exported copy pays for the copies.
    """
    new = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    for node in list(new.graph.nodes):
        masked = len(node.args) > 3 and node.args[3] is not None or node.kwargs.get("attn_mask") is not None
        if node.target == SDPA and masked:
            _pin(node)
    new.recompile()
    return new
