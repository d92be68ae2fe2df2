"""Build a TensorRT engine from a checked ONNX model: graphprune's ``target="trt"`` copies this file, unchanged, beside
``model.onnx`` as ``build_engine.py`` (it imports nothing from graphprune), and runs it itself where ``tensorrt``
imports.

    python build_engine.py                      # model.onnx + profile.json in this folder -> model.plan
    python build_engine.py --onnx m.onnx --profile p.json --engine m.plan [--fp16]

``profile.json`` holds one optimisation profile: for every input, its ``min``, ``opt`` and ``max`` shapes (the batch
axis is dynamic; token counts are fixed by the recipe). ``trtexec`` takes the same profile: see ``build_engine.sh``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build_engine(onnx: Path, profile: dict, engine: Path, fp16: bool = False) -> Path:
    """Parse ``onnx``, build a serialized engine with the optimisation ``profile``, write it to ``engine``."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    explicit = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)  # TensorRT < 10 needs it
    network = builder.create_network(0 if explicit is None else 1 << int(explicit))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx)):  # (reads model.onnx.data beside it)
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx}: {errors}")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    shapes = builder.create_optimization_profile()
    for name, s in profile.items():
        shapes.set_shape(name, tuple(s["min"]), tuple(s["opt"]), tuple(s["max"]))
    config.add_optimization_profile(shapes)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT could not build an engine from {onnx} (see the messages above)")
    tmp = engine.with_name(f".{engine.name}.tmp")
    tmp.write_bytes(bytes(serialized))
    os.replace(tmp, engine)  # never a half-written engine
    return engine


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Build a TensorRT engine from the checked ONNX model.")
    # model.onnx, or denoiser.onnx for a diffusion denoiser (not ONNX Runtime's copy, *.ort.onnx: its contrib ops)
    models = sorted(p for p in HERE.glob("*.onnx") if not p.name.endswith(".ort.onnx"))
    onnx = models[0] if len(models) == 1 else HERE / "model.onnx"
    p.add_argument("--onnx", type=Path, default=onnx)
    p.add_argument("--profile", type=Path, default=HERE / "profile.json")
    p.add_argument("--engine", type=Path, default=onnx.with_suffix(".plan"))
    p.add_argument("--fp16", action="store_true", help="allow fp16 kernels (check the outputs against model.onnx)")
    args = p.parse_args(argv)
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        print("build_engine.py needs TensorRT: pip install tensorrt (or run build_engine.sh where trtexec is)",
              file=sys.stderr)
        return 2
    path = build_engine(args.onnx, json.loads(args.profile.read_text()), args.engine, args.fp16)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
