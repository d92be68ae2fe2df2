"""The ONNX target: export with a dynamic batch, validate in ONNX Runtime, run with ORT."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.utils._pytree as pytree

from graphprune.buckets import check_length, padded
from graphprune.capture import SHORTEST, dynamic_shapes
from graphprune.errors import ExportError, first_line
from graphprune.exporters.files import publish, staging_dir
from graphprune.ops.onnx import TRANSLATIONS
from graphprune.passes.layout import pin_attention_layout
from graphprune.report import max_abs_diff

TOLERANCE = 1e-4
OPSET = 18
LARGE_GRAPH = 1500  # FX nodes


def _session(path: Path, threads: int | None = None):
    """An ONNX Runtime CPU session on ``threads`` intra-op threads (default: PyTorch's, ``torch.get_num_threads()``,
    so that ``torch.set_num_threads`` governs the eager and the exported models alike)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OnnxModel:
    """Runs an exported ONNX model in ONNX Runtime with torch tensors in and out (on PyTorch's thread count unless
    ``threads`` says otherwise)."""

    def __init__(self, path, out_spec=None, report=None, threads: int | None = None, max_tokens: int | None = None):
        self.path = Path(path)
        self.session = _session(self.path, threads)
        self.out_spec = out_spec
        self.report = report
        self.max_tokens = max_tokens  # exported with a symbolic sequence length: the longest checked (None: fixed)

    def __call__(self, *args):
        flat = [a for a in pytree.tree_leaves(args) if isinstance(a, torch.Tensor)]
        if self.max_tokens is not None and flat:
            check_length(flat[0].shape[1], self.max_tokens)
        feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(self.session.get_inputs(), flat)}
        outs = [torch.from_numpy(np.asarray(o)) for o in self.session.run(None, feeds)]
        if self.out_spec is None:
            return outs[0] if len(outs) == 1 else tuple(outs)
        return pytree.tree_unflatten(outs, self.out_spec)


@contextlib.contextmanager
def _quiet_loggers(*names: str):
    """Silence the exporter's own INFO/WARNING chatter (e.g. onnx_ir's "Attribute type is ambiguous"), then restore."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def length_checks(example_inputs: tuple, max_tokens: int | None) -> list[tuple]:
    """The inputs an export is checked on: the example; for a graph with a symbolic sequence length (the example at
    the longest, ``max_tokens``), also the example cut to the shortest length and to a middle one."""
    if max_tokens is None:
        return [example_inputs]
    return [padded(example_inputs, n) for n in sorted({SHORTEST, (SHORTEST + max_tokens) // 2, max_tokens})]


def export_onnx(module: torch.fx.GraphModule, example_inputs: tuple, output: Path, tolerance: float = TOLERANCE,
                max_tokens: int | None = None):
    """Export ``module`` to ``output`` (.onnx plus .onnx.data), validated in ORT. Returns (OnnxModel, diff).
    ``max_tokens``: a text model's graph with a symbolic sequence length (the example at the longest length), exported
    with one and checked at the shortest length, a middle one and the longest."""
    output = Path(output)
    checks = length_checks(example_inputs, max_tokens)
    with staging_dir(output.parent) as tmp:
        staged = tmp / output.name
        log = io.StringIO()
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(log), _quiet_loggers("torch.onnx", "onnx_ir"):
                warnings.simplefilter("ignore")
                program = torch.onnx.export(
                    pin_attention_layout(module), example_inputs, dynamo=True, dynamic_shapes=dynamic_shapes(example_inputs, max_tokens),
                    custom_translation_table=TRANSLATIONS, opset_version=OPSET, verbose=False,
                    # onnxscript's rewriter is slow on very large graphs (unrolled loops such as ATC's
                    # clustering): there ONNX Runtime's own graph optimisations at load time suffice
                    optimize=len(module.graph.nodes) < LARGE_GRAPH,
                )
                program.save(str(staged), external_data=True)
        except Exception as err:  # noqa: BLE001
            raise ExportError(f"ONNX export failed: {first_line(err)}") from err
        with torch.no_grad():
            expected = [module(*inputs) for inputs in checks]
        _, out_spec = pytree.tree_flatten(expected[0])
        runner = OnnxModel(staged, out_spec)
        diff = max(max_abs_diff(runner(*inputs), out) for inputs, out in zip(checks, expected))
        if not diff <= tolerance:
            raise ExportError(f"the ONNX model differs from the eager model by {diff:.3g} (> {tolerance}); nothing was written")
        files = sorted(tmp.iterdir())
        publish(files, output.parent, last=staged)
    return OnnxModel(output, out_spec, max_tokens=max_tokens), diff
