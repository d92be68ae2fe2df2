"""Transformer blocks: their token input, attention site and the reduction point."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import Node

from graphprune.errors import UnsupportedArchitectureError
from graphprune.patterns.attention import AttentionSite

aten = torch.ops.aten


@dataclass
class Block:
    index: int
    path: str
    input: Node  # the token marker at the block's input
    site: AttentionSite
    residual: Node  # x + attn(...): where reduction happens, before the MLP
    tokens: int  # tokens entering the block in the unreduced model
    masks: list = field(default_factory=list)  # token_mask markers: other block inputs indexed by token


def inside(node: Node, path: str) -> bool:
    """Whether ``node`` was recorded inside the module at ``path`` (or one of its children)."""
    return any(p == path or p.startswith(path + ".") for p, _ in node.meta.get("nn_module_stack", {}).values())


def descendants(start: Node, stop_at: set[Node]) -> set[Node]:
    seen, stack = set(), [start]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u not in seen and u not in stop_at:
                seen.add(u)
                stack.append(u)
    return seen


def find_residual(marker: Node, site: AttentionSite, order: dict, end: Node, path: str) -> Node:
    """The first ``add(x_in, f(attn))`` after the attention site: the attention residual."""
    after_attn = descendants(site.node, {end})
    for n in sorted(after_attn, key=order.__getitem__):
        if n.target == aten.add.Tensor and marker in n.args:
            other = n.args[1] if n.args[0] is marker else n.args[0]
            if other in after_attn:
                return n
    raise UnsupportedArchitectureError(
        f"block {path}: no residual connection 'x + attention(x)' found after its attention; "
        "parallel or non-residual blocks are not supported"
    )


def check_tokenwise_after(marker: Node, residual: Node, order: dict, end: Node, path: str) -> None:
    """After the reduction point nothing in the block may use the block's input token count."""
    for sym in [u for u in marker.users if u.target == aten.sym_size.int and u.args[1] == 1]:
        for user in sym.users:
            if order[residual] < order[user] < order[end]:
                raise UnsupportedArchitectureError(
                    f"block {path}: '{user.name}' uses the token count after the attention residual "
                    "(e.g. a convolutional MLP); tokens cannot be reduced at this block"
                )
