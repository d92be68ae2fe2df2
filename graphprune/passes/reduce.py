"""Insert a token reduction at a block's reduction point (after the attention residual)."""

from __future__ import annotations

from typing import Callable


from graphprune.passes.emit import emit
from graphprune.patterns.block import Block


def reduce_after_residual(block: Block, fn: Callable, *args):
    """Insert ``fn(x, *args)`` after ``x = x + attn(x)`` and feed its result to the rest of the model.

    ``fn`` returns the reduced tokens, or a tuple whose first item is the reduced tokens;
    the whole result (as nodes) is returned.
    """
    x = block.residual
    graph = x.graph
    before = set(graph.nodes)
    out = emit(graph, x, fn, x, *args)
    new_x = out[0] if isinstance(out, (tuple, list)) else out
    inserted = set(graph.nodes) - before
    x.replace_all_uses_with(new_x, delete_user_cb=lambda user: user not in inserted)
    return out


