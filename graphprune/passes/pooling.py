"""Make the model's token pooling aware of token sizes (merged tokens count several times)."""

from __future__ import annotations

from torch.fx import Node

from graphprune.passes.bias import add_attention_bias
from graphprune.passes.emit import emit_before
from graphprune.patterns.attention import AttentionSite
from graphprune.patterns.layout import TokenLayout


def size_weighted_pooling(layout: TokenLayout, size: Node) -> None:
    """mean(tokens) -> sum(size * tokens) / sum(size); attention pools get + log(size) on their keys."""
    for mean, start in layout.mean_pools:
        keepdim = bool(mean.args[2]) if len(mean.args) > 2 else bool(mean.kwargs.get("keepdim", False))

        def weighted(t, s, start=start, keepdim=keepdim):
            s = s[:, start:]
            return (t * s).sum(dim=1, keepdim=keepdim) / s.sum(dim=1, keepdim=keepdim)

        new = emit_before(mean.graph, mean, weighted, mean.args[0], size)
        mean.replace_all_uses_with(new)
        mean.graph.erase_node(mean)
    for sdpa, start in layout.attention_pools:
        bias = emit_before(sdpa.graph, sdpa, lambda s, start=start: s[:, start:, 0].log()[:, None, None, :], size)
        add_attention_bias(AttentionSite(node=sdpa, kind="sdpa", q=sdpa.args[0], k=sdpa.args[1], v=sdpa.args[2]), bias)
