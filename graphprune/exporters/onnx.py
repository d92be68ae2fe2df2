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

from graphprune.capture import dynamic_shapes
from graphprune.errors import ExportError, first_line
from graphprune.exporters.files import publish, staging_dir
from graphprune.ops.onnx import TRANSLATIONS
from graphprune.passes.layout import pin_attention_layout
from graphprune.report import max_abs_diff

TOLERANCE = 1e-4
OPSET = 18
LARGE_GRAPH = 1500  # FX nodes


def _session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OnnxModel:
    """Runs an exported ONNX model in ONNX Runtime with torch tensors in and out."""

    def __init__(self, path, out_spec=None, report=None, threads: int | None = None):
        self.path = Path(path)
        self.session = _session(self.path, threads)
        self.out_spec = out_spec
        self.report = report

    def __call__(self, *args):
        flat = [a for a in pytree.tree_leaves(args) if isinstance(a, torch.Tensor)]
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


def export_onnx(module: torch.fx.GraphModule, example_inputs: tuple, output: Path, tolerance: float = TOLERANCE):
    """Export ``module`` to ``output`` (.onnx plus .onnx.data), validated in ORT. Returns (OnnxModel, diff)."""
    output = Path(output)
    with staging_dir(output.parent) as tmp:
        staged = tmp / output.name
        log = io.StringIO()
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(log), _quiet_loggers("torch.onnx", "onnx_ir"):
                warnings.simplefilter("ignore")
                program = torch.onnx.export(
                    pin_attention_layout(module), example_inputs, dynamo=True, dynamic_shapes=dynamic_shapes(example_inputs),
                    custom_translation_table=TRANSLATIONS, opset_version=OPSET, verbose=False,
                    # onnxscript's rewriter is slow on very large graphs (unrolled loops such as ATC's
                    # clustering): there ONNX Runtime's own graph optimisations at load time suffice
                    optimize=len(module.graph.nodes) < LARGE_GRAPH,
                )
                program.save(str(staged), external_data=True)
        except Exception as err:  # noqa: BLE001
            raise ExportError(f"ONNX export failed: {first_line(err)}") from err
        with torch.no_grad():
            expected = module(*example_inputs)
        _, out_spec = pytree.tree_flatten(expected)
        runner = OnnxModel(staged, out_spec)
        diff = max_abs_diff(runner(*example_inputs), expected)
        if not diff <= tolerance:
            raise ExportError(f"the ONNX model differs from the eager model by {diff:.3g} (> {tolerance}); nothing was written")
        files = sorted(tmp.iterdir())
        publish(files, output.parent, last=staged)
    return OnnxModel(output, out_spec), diff
