"""The TensorRT target: the checked ONNX model, plus what builds its engine wherever TensorRT is installed.

TensorRT cannot be installed everywhere graphprune runs. ``target="trt"`` therefore writes, beside ``model.onnx``
(checked in ONNX Runtime first): ``profile.json`` (the optimisation profile: dynamic batch; fixed token counts, or a
symbolic sequence length from 2 tokens to the longest),
``build_engine.sh`` (the ``trtexec`` command line) and ``build_engine.py`` (the same build with TensorRT's Python
builder; a copy of :mod:`graphprune.exporters.trt_build`). Where ``tensorrt`` imports, the engine is built right away
(``model.plan``); elsewhere the report says it was not built. No engine is ever claimed that was not built.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from graphprune.capture import SHORTEST
from graphprune.exporters import trt_build
from graphprune.exporters.files import write_text

MAX_BATCH = 32  # the profile's largest batch (the example's batch is its optimum)


def tensorrt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class TrtBuild:
    """What ``target="trt"`` wrote: the build files, and the engine if it was built here (else None, and why)."""

    profile: Path
    script: Path
    shell: Path
    engine: Path | None
    note: str


def profile_for(inputs: dict[str, tuple], max_batch: int = MAX_BATCH, fixed: frozenset = frozenset(),
                tokens: frozenset = frozenset()) -> dict:
    """One optimisation profile: every input's shape at batch 1, at the example's batch, and at ``max_batch``; the
    inputs named in ``fixed`` (no batch axis) at their one shape. The inputs named in ``tokens`` have a symbolic
    sequence length on their second axis: from ``SHORTEST`` tokens to the example's (the longest), its optimum."""

    def least(name, shape):
        return [1, SHORTEST, *shape[2:]] if name in tokens else [1, *shape[1:]]

    return {name: {"min": list(shape), "opt": list(shape), "max": list(shape)} if name in fixed else
            {"min": least(name, shape), "opt": list(shape), "max": [max(max_batch, shape[0]), *shape[1:]]}
            for name, shape in inputs.items()}


def trtexec_command(onnx: Path, profile: dict, engine: Path) -> str:
    def shapes(key):
        return ",".join(f"{name}:{'x'.join(map(str, s[key]))}" for name, s in profile.items())

    return shlex.join(["trtexec", f"--onnx={onnx.name}", f"--saveEngine={engine.name}", f"--minShapes={shapes('min')}",
                       f"--optShapes={shapes('opt')}", f"--maxShapes={shapes('max')}"])


def write_trt_build(onnx: Path, inputs: dict[str, tuple], max_batch: int = MAX_BATCH,
                    fixed: frozenset = frozenset(), tokens: frozenset = frozenset()) -> TrtBuild:
    """Write the build files beside ``onnx`` (an exported, checked model); build the engine if TensorRT imports.
    ``fixed``: inputs without a batch axis; ``tokens``: see :func:`profile_for`."""
    folder, engine = onnx.parent, onnx.with_suffix(".plan")
    profile = profile_for(inputs, max_batch, frozenset(fixed), frozenset(tokens))
    profile_path = write_text(folder / "profile.json", json.dumps(profile, indent=2))
    script = write_text(folder / "build_engine.py", Path(trt_build.__file__).read_text(encoding="utf-8"))
    shell = write_text(folder / "build_engine.sh", "#!/bin/sh\n# Build the TensorRT engine from the checked ONNX model "
                       "(the same profile as build_engine.py).\ncd \"$(dirname \"$0\")\" && "
                       + trtexec_command(onnx, profile, engine) + "\n")
    shell.chmod(0o755)
    if not tensorrt_available():
        return TrtBuild(profile_path, script, shell, None,
                        "TensorRT is not installed here: no engine was built. Run build_engine.sh (trtexec) or "
                        "python build_engine.py where TensorRT is installed")
    trt_build.build_engine(onnx, profile, engine)
    return TrtBuild(profile_path, script, shell, engine, f"built {engine}")
