"""Remove the capture markers once the rewrite is done."""

from __future__ import annotations

import torch

from graphprune.ops.markers import MASK_MARKER, MARKER


def remove_markers(gm: torch.fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if node.target is MARKER or node.target is MASK_MARKER:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
