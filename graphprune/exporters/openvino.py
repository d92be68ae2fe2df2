"""The OpenVINO target: an OpenVINO IR (``model.xml`` + ``model.bin``) converted from the checked ONNX model, compiled
for the CPU and checked against the eager model (≤ 1e-4, float32 inference) before it is written."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.utils._pytree as pytree

from graphprune.buckets import check_length
from graphprune.errors import ExportError, first_line
from graphprune.exporters.files import publish, staging_dir
from graphprune.report import max_abs_diff

TOLERANCE = 1e-4
CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}  # (a CPU with bf16 units would otherwise run in bf16)


def _config() -> dict:
    """The CPU plugin's settings: float32, on PyTorch's thread count (``torch.set_num_threads`` governs the eager and
    the exported models alike)."""
    return {**CONFIG, "INFERENCE_NUM_THREADS": torch.get_num_threads()}


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


class OpenVinoModel:
    """Runs an OpenVINO IR compiled for the CPU, with torch tensors in and out, on PyTorch's thread count."""

    def __init__(self, path, out_spec=None, report=None, max_tokens: int | None = None):
        import openvino as ov

        self.path = Path(path)
        self.compiled = ov.Core().compile_model(str(self.path), "CPU", _config())
        self.out_spec = out_spec
        self.report = report
        self.max_tokens = max_tokens  # converted with a symbolic sequence length: the longest checked (None: fixed)

    def __call__(self, *args):
        flat = [a.detach().cpu().numpy() for a in pytree.tree_leaves(args) if isinstance(a, torch.Tensor)]
        if self.max_tokens is not None and flat:
            check_length(flat[0].shape[1], self.max_tokens)
        result = self.compiled(flat)
        outs = [torch.from_numpy(np.asarray(result[o])) for o in self.compiled.outputs]
        if self.out_spec is None:
            return outs[0] if len(outs) == 1 else tuple(outs)
        return pytree.tree_unflatten(outs, self.out_spec)


def export_openvino(onnx: Path, cases: list[tuple], tolerance: float = TOLERANCE,
                    exposed: list[str] | None = None, check: Callable | None = None, max_tokens: int | None = None):
    """Convert the checked ONNX model ``onnx`` to ``model.xml`` / ``model.bin`` beside it; compiled for the CPU and
    compared first with the eager outputs on each of ``cases`` ((inputs, eager outputs) pairs: the example, and other
    lengths where the graph's length is symbolic). Returns (OpenVinoModel, diff). A graph
    whose check needs more than its outputs gives ``check(run)`` instead: ``run`` takes the inputs to the outputs
    followed by the inner tensors named ``exposed`` (the IR written keeps its own outputs only); ``check`` raises
    ExportError or returns what it found. ``max_tokens``: the graph's sequence length is symbolic, up to it."""
    if not openvino_available():
        raise ExportError("target='openvino' needs OpenVINO: pip install openvino (or graphprune[deploy])")
    import openvino as ov

    onnx = Path(onnx)
    xml = onnx.with_suffix(".xml")
    out_spec = pytree.tree_flatten(cases[0][1])[1] if cases else None
    with staging_dir(onnx.parent) as tmp:
        staged = tmp / xml.name
        try:
            model = ov.convert_model(str(onnx))
            ov.save_model(model, str(staged), compress_to_fp16=False)
        except Exception as err:  # noqa: BLE001
            raise ExportError(f"OpenVINO could not convert the ONNX model: {first_line(err)}") from err
        if check is not None:
            model.add_outputs(list(exposed or []))
            compiled = ov.Core().compile_model(model, "CPU", _config())

            def run(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
                result = compiled([t.detach().cpu().numpy() for t in tensors])
                return [torch.from_numpy(np.asarray(result[o])) for o in compiled.outputs]

            diff = check(run)
        else:
            runner = OpenVinoModel(staged, out_spec)
            diff = max(max_abs_diff(runner(*inputs), expected) for inputs, expected in cases)
            if not diff <= tolerance:
                raise ExportError(f"the OpenVINO model differs from the eager model by {diff:.3g} (> {tolerance}); "
                                  "nothing was written")
        publish(sorted(tmp.iterdir()), onnx.parent, last=staged)
    return OpenVinoModel(xml, out_spec, max_tokens=max_tokens), diff
