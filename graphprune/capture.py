"""Capture: ``torch.export`` with a dynamic batch and a symbolic token dimension.

Two exports. The first, plain one finds the attention sites and the transformer blocks
that own them (from ``nn_module_stack``). The second routes every block's input, and the
last block's output, through the pass-through marker op ``graphprune::tokens`` whose fake
implementation returns a fresh data-dependent token count: each reshape inside a block then
reads its token count from the tensor (``sym_size``) instead of a literal, so later passes
may change the number of tokens flowing between blocks. Markers are attached with
process-wide module hooks that live only for the duration of the export; the user's model
is never modified (its train/eval flags are switched for the export and restored).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import torch
from torch.export import Dim

from graphprune.errors import GraphPruneError, UnsupportedArchitectureError
from graphprune.ops.markers import MARKER
from graphprune.patterns.attention import find_attention_sites


@dataclass
class Captured:
    gm: torch.fx.GraphModule  # unlifted graph, markers still in place
    example_inputs: tuple
    block_paths: list[str]


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Run ``model`` in eval mode, then restore every submodule's own training flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def batch_inputs(example_inputs: tuple) -> tuple:
    """A dynamic batch needs an example batch of at least 2 (1 specialises)."""
    out = []
    for t in example_inputs:
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == 1:
            t = t.expand(2, *t.shape[1:]).clone()
        out.append(t)
    return tuple(out)


def dynamic_batch_shapes(example_inputs: tuple):
    batch = Dim("batch", min=1, max=4096)
    return tuple({0: batch} if isinstance(t, torch.Tensor) and t.dim() > 0 else None for t in example_inputs)


def export(module, example_inputs: tuple):
    return torch.export.export(module, example_inputs, dynamic_shapes=dynamic_batch_shapes(example_inputs), strict=False)


_INDEXED = re.compile(r"\.\d+$")


def block_path_of(node: torch.fx.Node) -> str | None:
    """The innermost enclosing module whose path ends in a container index (``blocks.3``)."""
    paths = [p for p, _ in node.meta.get("nn_module_stack", {}).values()]
    for path in reversed(paths):
        if _INDEXED.search(path):
            return path
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def capture(model: torch.nn.Module, example_inputs: tuple) -> Captured:
    example_inputs = batch_inputs(example_inputs)
    with eval_mode(model), torch.no_grad():
        try:
            model(*example_inputs)
        except Exception as err:  # noqa: BLE001  (the user's model raised: report why)
            shapes = [tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)]
            raise GraphPruneError(
                f"the example inputs {shapes} do not fit the model ({_first_line(err)}); "
                "pass example_inputs (or --input-size) of the shape the model expects"
            ) from err
        try:
            plain = export(model, example_inputs)
        except Exception as err:  # noqa: BLE001
            raise UnsupportedArchitectureError(f"torch.export could not capture the model: {_first_line(err)}") from err

        sites = find_attention_sites(plain.graph_module.graph)
        if not sites:
            raise UnsupportedArchitectureError(
                "no attention found in the captured graph (neither scaled_dot_product_attention "
                "nor softmax(q @ k^T) @ v): graphprune reduces tokens of transformer models"
            )
        paths: list[str] = []
        for site in sites:
            path = block_path_of(site.node)
            if path is not None and path not in paths:
                paths.append(path)
        if not paths:
            raise UnsupportedArchitectureError("attention was found, but not inside a stack of indexed blocks (blocks.0, blocks.1, ...)")
        blocks = {model.get_submodule(p): p for p in paths}
        last = model.get_submodule(paths[-1])

        def mark(t, where):
            if not isinstance(t, torch.Tensor) or t.dim() != 3:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise UnsupportedArchitectureError(
                    f"{where} is {shape}, not a token sequence (batch, tokens, channels): windowed or "
                    "spatial blocks (Swin-style, convolutional stages) cannot be token-reduced"
                )
            return torch.ops.graphprune.tokens(t)

        def pre_hook(module, args):
            if module in blocks:
                if not args:
                    raise UnsupportedArchitectureError(f"block {blocks[module]} takes its tokens as a keyword argument; not supported yet")
                return (mark(args[0], f"the input of block {blocks[module]}"),) + tuple(args[1:])
            return None

        def post_hook(module, args, output):
            if module is last:
                if isinstance(output, tuple):
                    return (mark(output[0], f"the output of block {paths[-1]}"),) + output[1:]
                return mark(output, f"the output of block {paths[-1]}")
            return None

        h1 = torch.nn.modules.module.register_module_forward_pre_hook(pre_hook)
        h2 = torch.nn.modules.module.register_module_forward_hook(post_hook)
        try:
            marked = export(model, example_inputs)
        except GraphPruneError:
            raise
        except Exception as err:  # noqa: BLE001
            raise UnsupportedArchitectureError(
                "the model's blocks depend on a fixed token count (" + _first_line(err) + "); this happens with "
                "relative position bias, rotary or other position tensors indexed inside the blocks, windowed "
                "attention, or convolutions between blocks, none of which can follow reduced tokens yet"
            ) from err
        finally:
            h1.remove()
            h2.remove()
    gm = marked.module()
    n_markers = sum(1 for n in gm.graph.nodes if n.target is MARKER)
    if n_markers != len(paths) + 1:
        raise UnsupportedArchitectureError(
            f"expected {len(paths)} block inputs and one output in the graph, found {n_markers} token markers: "
            "a block is called more than once or not at all"
        )
    return Captured(gm=gm, example_inputs=example_inputs, block_paths=paths)
