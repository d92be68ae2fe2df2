"""Follow the tokens through a rewrite: counts, sizes, token maps, masks, and the output.

A recipe walks the blocks with a :class:`TokenFlow` and calls :meth:`TokenFlow.reduce` where
it reduces tokens. The flow keeps what later blocks and the output need:

* ``size`` (B, n, 1): how many original tokens each token stands for (merges add up);
* ``origin`` (B, N): the current index of every original token, and ``rep`` (B, n): one
  original token per current token (composed from each op's ``assign`` and ``rep`` maps);
* attention masks and other block inputs indexed by token are gathered with ``rep`` so
  they follow the tokens (padding stays masked out);
* with proportional attention, + log(size) on the attention logits of later blocks;
* at the output, per-token outputs are scattered back to the original token count
  (``restore=True``: each original position reads the token it went into), or returned
  reduced together with the sizes.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.utils._pytree as pytree
from torch.fx import Node

from graphprune.errors import RecipeError
from graphprune.passes.bias import add_attention_bias
from graphprune.passes.emit import emit, emit_before
from graphprune.passes.pooling import size_weighted_pooling
from graphprune.passes.reduce import reduce_after_residual
from graphprune.patterns import Block, ModelGraph


def gather_tokens(t, idx, dims: list[int], rank: int):
    """Index the token dimensions ``dims`` of ``t`` (B, ...) with ``idx`` (B, n)."""
    for d in dims:
        index = idx.reshape([idx.shape[0] if i == 0 else idx.shape[1] if i == d else 1 for i in range(rank)])
        t = t.gather(d, index.expand([-1 if i == d else t.shape[i] for i in range(rank)]))
    return t


def _key_valid(mask, dtype: torch.dtype):
    """(B, n) bool: keys that at least one query may attend to (False for padding)."""
    ok = mask if dtype == torch.bool else mask > torch.finfo(dtype).min / 2
    return ok.flatten(1, -2).any(dim=1)


def _compose(old, assign):
    """Where each original token is now, given where it was (``old``; -1: dropped) and the step's ``assign``."""
    return torch.where(old >= 0, assign.gather(1, old.clamp(min=0)), -1)


def compose_maps(first: tuple, second: tuple) -> tuple:
    """The (assign, rep) maps of two reductions applied one after the other."""
    return _compose(first[0], second[0]), first[1].gather(1, second[1])


def _at_origin(x, origin):
    return x.gather(1, origin.clamp(min=0)[..., None].expand(-1, -1, x.shape[-1]))


def _freeze(x, old, new, canvas=None):
    """Record the tokens dropped by this step, at their original positions."""
    before = x if old is None else _at_origin(x, old)
    dropped = (new < 0)[..., None]
    if old is not None:
        dropped = dropped & (old >= 0)[..., None]
    return torch.where(dropped, before, before.new_zeros(()) if canvas is None else canvas)


def _restore(x, origin, canvas=None):
    full = _at_origin(x, origin)
    return full if canvas is None else torch.where((origin >= 0)[..., None], full, canvas)


def token_dims(node: Node) -> list[int]:
    """The dimensions of ``node``'s value that are indexed by token (symbolic sizes after the batch)."""
    val = node.meta["val"]
    return [d for d in range(1, val.dim()) if not isinstance(val.shape[d], int)]


class TokenFlow:
    def __init__(self, graph: ModelGraph, prop_attn: bool = False, restore: bool = True):
        self.graph = graph
        self.prop_attn = prop_attn
        self.restore = restore
        self.n = graph.tokens
        self.size: Node | None = None
        self.origin: Node | None = None
        self.rep: Node | None = None
        self.counts: list[int] = []
        self._bias: Node | None = None
        self._canvas: Node | None = None  # (B, N, C) dropped tokens as they were when dropped
        if not restore and graph.layout.opaque:
            raise RecipeError(
                f"restore_tokens=False needs a head graphprune can follow, but {graph.layout.opaque}; "
                "keep restore_tokens=True (the default)"
            )

    @property
    def fx(self) -> torch.fx.Graph:
        return self.graph.gm.graph

    def blocks(self):
        """Iterate the blocks, fixing each block's masks and attention bias first; finish the output after."""
        for block in self.graph.blocks:
            self._enter(block)
            yield block
        self._finish()

    def _enter(self, block: Block) -> None:
        self.counts.append(self.n)
        if self.rep is not None:
            for marker in block.masks:
                mask = marker.args[0]
                moved = emit_before(self.fx, marker, gather_tokens, mask, self.rep, token_dims(marker), marker.meta["val"].dim())
                marker.replace_input_with(mask, moved)
        if self._bias is not None:
            add_attention_bias(block.site, self._bias)

    def valid(self, block: Block) -> Node | None:
        """(B, n) bool node, False for padding tokens, when the block has a token-indexed mask."""
        masks = [m for m in block.masks if len(token_dims(m)) and token_dims(m)[-1] == m.meta["val"].dim() - 1]
        if not masks:
            return None
        return emit(self.fx, masks[0], _key_valid, masks[0], masks[0].meta["val"].dtype)

    def reduce(self, block: Block, fn: Callable, *args, out_tokens: int, drops: bool = False) -> tuple:
        """Insert ``fn(x, *args) -> (x, assign, rep[, size])`` at the block's reduction point.

        ``drops``: the op may drop tokens (``assign == -1``); a restored output then shows a
        dropped token as it was when it was dropped.
        """
        x_in = block.residual
        out = reduce_after_residual(block, fn, *args)
        x, assign, rep = out[:3]
        produced = {n for n in out if isinstance(n, Node)}
        anchor = next(n for n in reversed(self.fx.nodes) if n in produced)  # maps are used after all of them exist
        if len(out) > 3:
            self.size = out[3]
            if self.prop_attn:
                self._bias = emit(self.fx, self.size, lambda s: s[..., 0].log()[:, None, None, :], self.size)
        elif self.size is not None:
            if not drops:
                raise RecipeError("a token reduction without sizes after one with sizes is not supported")
            self.size = emit(self.fx, anchor, lambda s, r: s.gather(1, r[..., None]), self.size, rep)  # a selection
        old = self.origin
        self.origin = assign if old is None else emit(self.fx, anchor, _compose, old, assign)
        self.rep = rep if self.rep is None else emit(self.fx, anchor if old is None else self.origin,
                                                      lambda prev, new: prev.gather(1, new), self.rep, rep)
        if drops and self.restore and self.graph.layout.per_token:
            self._canvas = emit(self.fx, self.origin, _freeze, x_in, old, self.origin, self._canvas)
        self.n = out_tokens
        block.residual = x  # a second reduction in this block acts on the reduced tokens
        return out

    def _finish(self) -> None:
        layout, output = self.graph.layout, self.graph.output
        if self.origin is None or not layout.per_token:
            return
        if self.restore:
            users = list(output.users)
            full = emit(self.fx, output, _restore, output, self.origin, self._canvas)
            for u in users:
                u.replace_input_with(output, full)
            return
        if self.size is not None:
            size_weighted_pooling(layout, self.size)
        if layout.returns_tokens:
            _append_output(self.graph.gm, self.size if self.size is not None else None, self.n)


def _append_output(gm: torch.fx.GraphModule, size: Node | None, n: int) -> None:
    """Return ``(original output, sizes)``; sizes (B, n) are all ones when no tokens merged."""
    graph = gm.graph
    out = next(n for n in graph.nodes if n.op == "output")
    anchor = out.prev
    if size is None:
        x = next(n for n in graph.nodes if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor))
        sizes = emit(graph, anchor, lambda t, n=n: t.new_ones((t.shape[0], n), dtype=torch.float32), x)
    else:
        sizes = emit(graph, anchor, lambda s: s[..., 0], size)
    leaves = list(out.args[0])
    out.args = (leaves + [sizes],)
    codegen = graph._codegen
    info = codegen.pytree_info
    spec = pytree.tree_structure((pytree.tree_unflatten(leaves, info.out_spec), 0))
    codegen.pytree_info = info._replace(out_spec=spec)
    gm.recompile()
