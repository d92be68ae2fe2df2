"""Pattern matching on the captured graph: attention sites, blocks, token layout."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

try:
    from torch.fx.experimental.symbolic_shapes import guarding_hint_or_throw, has_guarding_hint
except ImportError:  # torch before 2.13: the symbolic node's own hint
    def has_guarding_hint(a) -> bool:
        return not isinstance(a, torch.SymInt) or a.node.has_hint()

    def guarding_hint_or_throw(a) -> int:
        return a.node.hint if isinstance(a, torch.SymInt) else a


from graphprune.errors import UnsupportedArchitectureError
from graphprune.ops.markers import MASK_MARKER, MARKER
from graphprune.patterns.attention import AttentionSite, find_attention_sites
from graphprune.patterns.block import Block, check_tokenwise_after, find_residual, inside
from graphprune.patterns.layout import TokenLayout, analyze_head, find_prefix

__all__ = ["AttentionSite", "Block", "ModelGraph", "TokenLayout", "analyze", "find_attention_sites"]


@dataclass
class ModelGraph:
    gm: torch.fx.GraphModule
    blocks: list[Block]
    output: torch.fx.Node  # marker on the last block's output
    layout: TokenLayout
    example_inputs: tuple

    @property
    def tokens(self) -> int:
        return self.blocks[0].tokens


def analyze(captured) -> ModelGraph:
    """Find blocks, their attention and residual, and the token layout in a captured graph."""
    gm = captured.gm
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    markers = [n for n in nodes if n.target is MARKER]
    sites = find_attention_sites(gm.graph)
    blocks = []
    for i, (path, marker) in enumerate(zip(captured.block_paths, markers)):
        end = markers[i + 1]
        own = [s for s in sites if order[marker] < order[s.node] < order[end]]
        if len(own) != 1:
            raise UnsupportedArchitectureError(
                f"block {path} has {len(own)} attention sites; graphprune supports blocks with one self-attention"
            )
        site = own[0]
        tokens = markers[0].args[0].meta["val"].shape[1]  # unreduced, every block sees N tokens
        if isinstance(tokens, torch.SymInt) and has_guarding_hint(tokens):  # a symbolic length: the example's count
            tokens = int(guarding_hint_or_throw(tokens))
        if not isinstance(tokens, int):
            raise UnsupportedArchitectureError(f"block {path}: the token count entering it is not static ({tokens})")
        kv_tokens, block_tokens = site.k.meta["val"].shape[-2], marker.meta["val"].shape[1]
        if statically_known_true(kv_tokens != block_tokens):
            raise UnsupportedArchitectureError(
                f"block {path}: attention runs over a different number of tokens than the block's input "
                "(windowed or pooled attention); not supported"
            )
        if not statically_known_true(kv_tokens == block_tokens):
            raise UnsupportedArchitectureError(
                f"block {path}: its attention splits the tokens and joins them again ({kv_tokens} tokens), e.g. "
                "rotary embeddings applied to the patch tokens only (DINOv3-style); graphprune cannot follow "
                "reduced tokens through such a split yet"
            )
        if i > 0 and not inside(marker.args[0], captured.block_paths[i - 1]):
            raise UnsupportedArchitectureError(
                f"'{marker.args[0].name}' runs between block {captured.block_paths[i - 1]} and block {path} "
                "(pooling, a convolution or a stage transition): tokens can only be reduced in a plain stack of blocks"
            )
        residual = find_residual(marker, site, order, end, path)
        check_tokenwise_after(marker, residual, order, end, path)
        masks = [n for n in nodes[order[marker] : order[end]] if n.target is MASK_MARKER]
        blocks.append(Block(index=i, path=path, input=marker, site=site, residual=residual, tokens=tokens, masks=masks))
    prefix, roles = find_prefix(markers[0])
    layout = TokenLayout(prefix=prefix, roles=roles)
    analyze_head(markers[-1], layout)
    return ModelGraph(gm=gm, blocks=blocks, output=markers[-1], layout=layout, example_inputs=captured.example_inputs)
