"""Capture: ``torch.export`` with a dynamic batch and a symbolic token dimension.

One eager forward pass finds the transformer blocks in which attention runs. The export
then routes every block's input, and the last block's output, through the pass-through marker op ``graphprune::tokens`` whose fake
implementation returns a fresh data-dependent token count: each reshape inside a block then
reads its token count from the tensor (``sym_size``) instead of a literal, so later passes
may change the number of tokens flowing between blocks. Markers are attached with
process-wide module hooks that live only for the duration of the export; the user's model
is never modified (its train/eval flags are switched for the export and restored).
"""

from __future__ import annotations

import contextlib
import copy
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.export import Dim
from torch.overrides import TorchFunctionMode

from graphprune.errors import GraphPruneError, UnsupportedArchitectureError, first_line
from graphprune.ops.markers import MARKER
from graphprune.patterns.attention import find_attention_sites
from graphprune.patterns.block import inside as _inside
from graphprune.report import max_abs_diff


@dataclass
class Captured:
    gm: torch.fx.GraphModule  # unlifted graph, markers still in place
    example_inputs: tuple
    block_paths: list[str]
    reference: object  # the original model's output on example_inputs
    max_abs_diff: float  # captured graph vs original model


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Run ``model`` in eval mode, then restore every submodule's own training flag."""
    flags = [(m, m.training) for m in model.modules()]
    for m, _ in flags:  # not model.eval(): modules loaded from a .pt2 refuse it
        m.training = False
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


def first_two(inputs: tuple) -> tuple:
    """The first two samples of a batch of inputs: a small example to capture with (dynamic batch)."""
    return tuple(t[:2] if isinstance(t, torch.Tensor) and t.dim() else t for t in inputs)


SHORTEST = 2  # the fewest tokens a symbolic sequence length takes


def dynamic_shapes(example_inputs: tuple, max_tokens: int | None = None, rewritten: bool = True):
    """A dynamic batch for every tensor input; with ``max_tokens``, also a symbolic sequence length from
    :data:`SHORTEST` to it on the second axis of every 2-D input as long as the first input's (token ids, attention
    mask, token types): strict when a model is captured (``rewritten=False``: an error if the model fixes its length),
    and for a rewritten graph one that takes the guards graphprune's token ops add (each block's count is a function of
    the length)."""
    batch = Dim("batch", min=1, max=4096)
    tokens, n = None, None
    if max_tokens is not None:
        tokens = Dim.DYNAMIC(min=SHORTEST, max=max_tokens) if rewritten else Dim("tokens", min=SHORTEST, max=max_tokens)
        n = example_inputs[0].shape[1]

    def axes(t):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return None
        return {0: batch, 1: tokens} if tokens is not None and t.dim() == 2 and t.shape[1] == n else {0: batch}

    return tuple(axes(t) for t in example_inputs)


def export(module, example_inputs: tuple, max_tokens: int | None = None, rewritten: bool = False):
    """``torch.export`` with a dynamic batch; with ``max_tokens``, a sequence length up to it (see
    :func:`dynamic_shapes`)."""
    return torch.export.export(module, example_inputs, strict=False,
                               dynamic_shapes=dynamic_shapes(example_inputs, max_tokens, rewritten))


_INDEXED = re.compile(r"\.\d+$")


_ATTENTION_FUNCS = {F.scaled_dot_product_attention, torch.softmax, F.softmax, torch.Tensor.softmax}


class _AttentionSpy(TorchFunctionMode):
    """Records the module stack whenever attention (SDPA or a softmax) runs."""

    def __init__(self, stack: list, found: list):
        super().__init__()
        self.stack, self.found = stack, found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _ATTENTION_FUNCS:
            path = next((p for p in reversed(self.stack) if p and _INDEXED.search(p)), None)
            if path is not None and path not in self.found:
                self.found.append(path)
        return func(*args, **(kwargs or {}))


def find_block_paths(model: torch.nn.Module, example_inputs: tuple) -> list[str]:
    """Run the model once eagerly and name the indexed blocks (``blocks.3``) in which attention runs.

    Cheap (one forward pass, no export); the marked export that follows matches and validates
    the attention sites themselves.
    """
    names = {m: n for n, m in model.named_modules()}
    stack: list = []
    found: list = []
    h1 = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, a: stack.append(names.get(m)))

    def leave(module, args, output):
        stack.pop()  # returns None: the output is left alone

    h2 = torch.nn.modules.module.register_module_forward_hook(leave)
    try:
        with _AttentionSpy(stack, found):
            model(*example_inputs)
    except GraphPruneError:
        raise
    except Exception as err:  # noqa: BLE001  (the user's model raised: report why)
        raise _inputs_do_not_fit(example_inputs, err) from err
    finally:
        h1.remove()
        h2.remove()
    if not found:
        raise UnsupportedArchitectureError(
            "no attention (scaled_dot_product_attention or softmax) runs inside a stack of indexed blocks "
            "(blocks.0, blocks.1, ...): graphprune reduces tokens of transformer models"
        )
    return found


def _inputs_do_not_fit(example_inputs: tuple, err: BaseException) -> GraphPruneError:
    shapes = [tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)]
    return GraphPruneError(
        f"the example inputs {shapes} do not fit the model ({first_line(err)}); "
        "pass example_inputs (or --input-size) of the shape the model expects"
    )


def _indexed_path(node: torch.fx.Node) -> str | None:
    paths = [p for p, _ in node.meta.get("nn_module_stack", {}).values()]
    return next((p for p in reversed(paths) if _INDEXED.search(p)), None)


_SHAPE_OPS = {torch.ops.aten.reshape.default, torch.ops.aten.view.default, torch.ops.aten.expand.default, torch.ops.aten._unsafe_view.default}


def mark_graph(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, list[str]]:
    """Markers for a module that is already a graph (e.g. loaded from a .pt2), on a copy of its graph.

    Blocks come from the ``nn_module_stack`` recorded at export. A .pt2 graph carries literal
    token counts in its reshapes; inside each block they are replaced by the block input's
    ``sym_size`` so the token count can change. The parameters are shared, not copied.
    """
    new = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    graph = new.graph
    paths: list[str] = []
    for site in find_attention_sites(graph):
        path = _indexed_path(site.node)
        if path is not None and path not in paths:
            paths.append(path)
    if not paths:
        raise UnsupportedArchitectureError("no attention found inside indexed blocks (blocks.0, ...) of the graph; it needs the module metadata torch.export records")
    aten = torch.ops.aten
    for i, path in enumerate(paths):
        members = [n for n in graph.nodes if n.op == "call_function" and _inside(n, path)]
        own = set(members)
        streams = {a for n in members for a in n.all_input_nodes
                   if a not in own and a.op != "get_attr" and isinstance(a.meta.get("val"), torch.Tensor) and a.meta["val"].dim() == 3}
        if len(streams) != 1:
            raise UnsupportedArchitectureError(f"block {path} of the graph does not take exactly one token sequence")
        stream = streams.pop()
        n_tok = stream.meta["val"].shape[1]
        with graph.inserting_before(members[0]):
            marker = graph.call_function(MARKER, (stream,))
            size = graph.call_function(aten.sym_size.int, (marker, 1))
        for n in members:
            n.replace_input_with(stream, marker)
            if n.target in _SHAPE_OPS and isinstance(n.args[1], (list, tuple)):
                n.args = (n.args[0], [size if (isinstance(d, int) and d == n_tok) else d for d in n.args[1]], *n.args[2:])
        if i == len(paths) - 1:
            outs = [n for n in members if any(u not in own for u in n.users)]
            if len(outs) != 1:
                raise UnsupportedArchitectureError(f"block {path} of the graph does not produce exactly one output")
            users = [u for u in outs[0].users if u not in own]
            with graph.inserting_after(outs[0]):
                out_marker = graph.call_function(MARKER, (outs[0],))
            for u in users:
                u.replace_input_with(outs[0], out_marker)
    graph.lint()
    new.recompile()
    return new, paths


def capture(model: torch.nn.Module, example_inputs: tuple, max_tokens: int | None = None) -> Captured:
    """``max_tokens``: a text model captured with a symbolic sequence length up to it (see :func:`dynamic_shapes`)."""
    example_inputs = batch_inputs(example_inputs)
    if isinstance(model, torch.fx.GraphModule):
        return _capture_graph(model, example_inputs, max_tokens)
    with eval_mode(model), torch.no_grad():
        paths = find_block_paths(model, example_inputs)
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

        seq: dict = {}

        def pre_hook(module, args):
            if module not in blocks:
                return None
            if not args:
                raise UnsupportedArchitectureError(f"block {blocks[module]} takes its tokens as a keyword argument; not supported yet")
            x = mark(args[0], f"the input of block {blocks[module]}")
            n = seq.setdefault("n", args[0].shape[1])  # the first block sees the concrete count

            def follow(t):  # other tensors indexed by token (attention masks) share the token symbol
                if not isinstance(t, torch.Tensor) or t.dim() < 2 or n not in t.shape[1:]:
                    return t
                if t.shape[0] != x.shape[0]:
                    raise UnsupportedArchitectureError(
                        f"block {blocks[module]} takes a {tuple(t.shape)} tensor indexed by token but not by sample "
                        "(rotary or other per-position embeddings); it cannot follow reduced tokens yet"
                    )
                return torch.ops.graphprune.token_mask(t, x, n)

            return (x, *map(follow, args[1:]))

        def post_hook(module, args, output):
            if module is last:
                if isinstance(output, tuple):
                    return (mark(output[0], f"the output of block {paths[-1]}"),) + output[1:]
                return mark(output, f"the output of block {paths[-1]}")
            return None

        h1 = torch.nn.modules.module.register_module_forward_pre_hook(pre_hook)
        h2 = torch.nn.modules.module.register_module_forward_hook(post_hook)
        try:
            marked = export(model, example_inputs, max_tokens)
        except GraphPruneError:
            raise
        except Exception as err:  # noqa: BLE001
            raise UnsupportedArchitectureError(
                "the model's blocks depend on a fixed token count (" + first_line(err) + "); this happens with "
                "relative position bias, rotary or other position tensors indexed inside the blocks, windowed "
                "attention, or convolutions between blocks, none of which can follow reduced tokens yet"
            ) from err
        finally:
            h1.remove()
            h2.remove()
    return _finish(model, marked.module(), example_inputs, paths)


def _capture_graph(model: torch.fx.GraphModule, example_inputs: tuple, max_tokens: int | None) -> Captured:
    with torch.no_grad():
        try:
            model(*example_inputs)
        except Exception as err:  # noqa: BLE001
            raise _inputs_do_not_fit(example_inputs, err) from err
        marked, paths = mark_graph(model)
        try:
            program = export(marked, example_inputs, max_tokens)
        except Exception as err:  # noqa: BLE001
            raise UnsupportedArchitectureError(
                f"the graph's blocks depend on a fixed token count ({first_line(err)}); a program exported with a "
                "static batch, or one whose token count is folded into other shapes, cannot be re-captured"
            ) from err
    return _finish(model, program.module(), example_inputs, paths)


def _finish(model, gm: torch.fx.GraphModule, example_inputs: tuple, paths: list[str]) -> Captured:
    n_markers = sum(1 for n in gm.graph.nodes if n.target is MARKER)
    if n_markers != len(paths) + 1:
        raise UnsupportedArchitectureError(
            f"expected {len(paths)} block inputs and one output in the graph, found {n_markers} token markers: "
            "a block is called more than once or not at all"
        )
    with eval_mode(model), torch.no_grad():
        reference = model(*example_inputs)
        try:
            got = gm(*example_inputs)
        except Exception as err:  # noqa: BLE001
            raise UnsupportedArchitectureError(
                f"the captured graph does not run with a variable token count ({first_line(err)}); the model "
                "probably changes or indexes tokens between or inside its blocks"
            ) from err
    diff = max_abs_diff(got, reference)
    return Captured(gm=gm, example_inputs=example_inputs, block_paths=paths, reference=reference, max_abs_diff=diff)
