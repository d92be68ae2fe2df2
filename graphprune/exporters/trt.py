"""The TensorRT target (engine build with plugins is a later milestone)."""

from __future__ import annotations

from graphprune.errors import ExportError


def tensorrt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def export_trt(*_args, **_kwargs):
    reason = "the 'tensorrt' package is not installed" if not tensorrt_available() else "the TensorRT builder is not implemented yet"
    raise ExportError(
        f"target='trt' is not available: {reason}. Use target='onnx': the ONNX model it writes (standard "
        "opset-18 ops, static token counts, dynamic batch) is what a TensorRT build takes, e.g. "
        "trtexec --onnx=model.onnx"
    )
