"""Evo-ViT: slow-fast token evolution (Xu et al., AAAI 2022), in the inference form of its DeiT release.

A global class attention ``g`` over the patch tokens is the class token's attention (the
block before the first stage sets it; inside a stage each block updates the kept tokens'
entries as ``g ← (1 − α)·g + α·g_block``, α = 0.5). At the start of each stage (default
⌊L/3⌋ and ⌊2L/3⌋: blocks 4 and 8 of DeiT-S) the ``keep`` fraction of patch tokens with the
highest ``g`` is selected, and the stage's blocks run on those (the fast tokens) only. The
other tokens (the slow ones) are left as they were, and at the end of the stage the updated
fast tokens are written back among them, so every block after a stage, and the output, sees
all the tokens again.

As in the released DeiT code, the slow tokens are frozen (no representative token and no
fast update, which the paper describes and the release leaves out). The release classifies
from the mean of all tokens with a retrained head; here the model's own head reads the
written-back tokens, so pretrained weights work unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from graphprune.errors import RecipeError, ScheduleError
from graphprune.ops.maps import prefix_index
from graphprune.passes.emit import emit, emit_before
from graphprune.passes.flow import gather_tokens, token_dims
from graphprune.patterns import ModelGraph
from graphprune.recipes.base import Recipe, option, register
from graphprune.recipes.options import parse_keep, parse_locations
from graphprune.recipes.scores import cls_attention, has_class_token


def _select(x, g, keep: int, protected: int):
    """The prefix and the ``keep`` patch tokens with the highest ``g`` (B, P): (tokens, index (B, n), g of the kept)."""
    top = g.argsort(dim=1, descending=True, stable=True)[:, :keep]
    head = prefix_index(x, protected)
    idx = torch.cat([head, top + protected], dim=1)
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1])), idx, g.gather(1, top)


def _write_back(full, idx, fast):
    return full.scatter(1, idx[..., None].expand(-1, -1, full.shape[-1]), fast)


@register
@dataclass
class EvoViT(Recipe):
    name = "evo_vit"
    summary = "run each stage's blocks on the tokens with the highest global class attention; the others wait"
    paper = "Evo-ViT: Slow-Fast Token Evolution for Dynamic Vision Transformer (AAAI 2022)"
    zero = {"keep": 1.0}

    keep: float = option(0.5, "fraction of the patch tokens each stage runs on")
    locations: Optional[list] = option(None, "block indices where a stage starts (default L/3, 2L/3)")
    alpha: float = option(0.5, "weight of each block's class attention in the global attention inside a stage")

    def validate(self) -> None:
        if not self.restore_tokens:
            raise RecipeError("evo_vit keeps every token (the slow ones wait and are written back): "
                              "restore_tokens=False does not apply to it")
        parse_keep(self.keep)
        if self.locations is not None:
            parse_locations(self.locations, 10**6)
        if not 0 <= self.alpha <= 1:
            raise ScheduleError(f"evo_vit alpha is a weight in [0, 1], got {self.alpha!r}")

    def stages(self, num_blocks: int) -> list[int]:
        if self.locations is None:
            return sorted({num_blocks // 3, 2 * num_blocks // 3} - {0})
        starts = parse_locations(self.locations, num_blocks)
        if 0 in starts:
            raise ScheduleError("evo_vit needs a block before each stage for the class attention: location 0 is not allowed")
        return starts

    def check(self, graph: ModelGraph) -> None:
        self.stages(len(graph.blocks))

    def apply(self, graph: ModelGraph) -> list[int]:
        protected, n = graph.layout.prefix, graph.tokens
        keep = min(n - protected, max(1, int((n - protected) * parse_keep(self.keep))))
        starts = self.stages(len(graph.blocks))
        if keep >= n - protected or not starts:
            return [n] * len(graph.blocks)
        fx, cls = graph.gm.graph, has_class_token(graph)
        ends = starts[1:] + [len(graph.blocks)]
        inputs = [b.input for b in graph.blocks] + [graph.output]
        g = g_fast = idx = None
        counts = [n] * len(graph.blocks)
        for start, end in zip(starts, ends):
            if g is None:  # the block before the first stage sets the global attention
                fn, args = cls_attention(graph.blocks[start - 1].site, has_cls=cls)
                g = emit(fx, graph.blocks[start - 1].site.node, lambda *a: fn(*a)[:, protected:], *args)
            marker = inputs[start]
            users = list(marker.users)
            x_fast, idx, g_fast = emit(fx, marker, _select, marker, g, keep, protected)
            for u in users:
                u.replace_input_with(marker, x_fast)
            for block in graph.blocks[start:end]:
                counts[block.index] = protected + keep
                for mask in block.masks:  # masks indexed by token follow the selection
                    moved = emit_before(fx, mask, gather_tokens, mask.args[0], idx, token_dims(mask), mask.meta["val"].dim())
                    mask.replace_input_with(mask.args[0], moved)
                if end < len(graph.blocks):  # the global attention only matters for a later stage
                    fn, args = cls_attention(block.site, has_cls=cls)
                    g_fast = emit(fx, block.site.node, lambda gf, *a, fn=fn: (1 - self.alpha) * gf + self.alpha * fn(*a)[:, protected:],
                                  g_fast, *args)
            stop = inputs[end]
            fast_out = stop.args[0]
            full = emit_before(fx, stop, _write_back, marker, idx, fast_out)
            stop.replace_input_with(fast_out, full)
            if end < len(graph.blocks):
                g = emit_before(fx, stop, lambda full_g, i, gf: full_g.scatter(1, i[:, protected:] - protected, gf), g, idx, g_fast)
        return counts
