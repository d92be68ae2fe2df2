"""The Triton target: a Triton Inference Server model repository around the checked ONNX model.

``target="triton"`` with ``output="repo/NAME"`` writes ``repo/NAME/1/model.onnx`` (+ ``.data``, checked in ONNX Runtime
first) and ``repo/NAME/config.pbtxt``: platform ``onnxruntime_onnx``, ``max_batch_size``, dynamic batching, one CPU
instance, and inputs and outputs whose names, data types and dims are the ONNX model's (the batch axis left out, -1
for any other dynamic axis). The server itself does not install here; run it with NVIDIA's container:
``docker run --rm -p8000:8000 -v $PWD/repo:/models nvcr.io/nvidia/tritonserver:<version>-py3 tritonserver
--model-repository=/models``.
"""

from __future__ import annotations

from pathlib import Path

from graphprune.errors import ExportError
from graphprune.exporters.files import write_text

MAX_BATCH = 32
TYPES = {"tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16", "tensor(double)": "TYPE_FP64",
         "tensor(int64)": "TYPE_INT64", "tensor(int32)": "TYPE_INT32", "tensor(int8)": "TYPE_INT8",
         "tensor(uint8)": "TYPE_UINT8", "tensor(bool)": "TYPE_BOOL", "tensor(bfloat16)": "TYPE_BF16"}


def _tensor(arg, batched: bool) -> str:
    """One input or output of the ONNX session as a config entry (batched: the batch axis left out; -1 for dynamic
    axes)."""
    if arg.type not in TYPES:
        raise ExportError(f"Triton has no data type for the ONNX type {arg.type} of '{arg.name}'")
    dims = [d if isinstance(d, int) else -1 for d in (arg.shape[1:] if batched else arg.shape)]
    return f'  {{\n    name: "{arg.name}"\n    data_type: {TYPES[arg.type]}\n    dims: [ {", ".join(map(str, dims))} ]\n  }}'


def model_config(session, name: str, max_batch_size: int = MAX_BATCH, filename: str | None = None) -> str:
    """``config.pbtxt`` for an ONNX Runtime session of the model (protobuf text format of Triton's ModelConfig).
    ``max_batch_size=0``: no batching by the server (each request carries its whole batch; every dim listed);
    ``filename``: the model file in the version folder when it is not ``model.onnx``."""
    batched = max_batch_size > 0
    for arg in session.get_inputs() if batched else ():
        if not arg.shape or isinstance(arg.shape[0], int):
            raise ExportError(f"the ONNX input '{arg.name}' has no dynamic batch axis; Triton batches along the first")
    inputs = ",\n".join(_tensor(a, batched) for a in session.get_inputs())
    outputs = ",\n".join(_tensor(a, batched) for a in session.get_outputs())
    return (f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {max_batch_size}\n'
            + (f'default_model_filename: "{filename}"\n' if filename else "")
            + f"input [\n{inputs}\n]\noutput [\n{outputs}\n]\n"
            + ("dynamic_batching {\n  max_queue_delay_microseconds: 1000\n}\n" if batched else "")
            + "instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]\n")


def model_folder(output) -> tuple[Path, Path]:
    """``output`` ("repo/NAME") as (the ONNX model's path ``repo/NAME/1/model.onnx``, the model's folder)."""
    folder = Path(output)
    if folder.suffix:
        raise ExportError(f"target='triton' writes a model folder inside a repository: give output='repo/NAME', not "
                          f"{folder}")
    return folder / "1" / "model.onnx", folder


def write_config(runner, folder: Path, max_batch_size: int = MAX_BATCH, filename: str | None = None) -> Path:
    """Write ``config.pbtxt`` for the checked ONNX model ``runner`` into the model's ``folder``."""
    return write_text(folder / "config.pbtxt", model_config(runner.session, folder.name, max_batch_size, filename))
