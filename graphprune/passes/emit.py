"""Insert eager-style code into an FX graph at a given point."""

from __future__ import annotations

from typing import Callable

import torch.utils._pytree as pytree
from torch.fx import Graph, Node
from torch.fx.proxy import GraphAppendingTracer, Proxy


def _run(graph: Graph, fn: Callable, args, kwargs):
    tracer = GraphAppendingTracer(graph)
    wrap = lambda a: Proxy(a, tracer) if isinstance(a, Node) else a  # noqa: E731
    out = fn(*[wrap(a) for a in args], **{k: wrap(v) for k, v in kwargs.items()})
    return pytree.tree_map(lambda p: p.node if isinstance(p, Proxy) else p, out)


def emit(graph: Graph, anchor: Node, fn: Callable, *args, **kwargs):
    """Insert ``fn(*args)`` (nodes become proxies) right after ``anchor``; returns the new node(s)."""
    # inserting_after(anchor) would put each new node directly after anchor, reversing their order
    with graph.inserting_before(anchor.next):
        return _run(graph, fn, args, kwargs)


def emit_before(graph: Graph, anchor: Node, fn: Callable, *args, **kwargs):
    with graph.inserting_before(anchor):
        return _run(graph, fn, args, kwargs)
