"""Serving an exported model on Ray Serve: replicas, dynamic batching, over Python handles and HTTP.

    handle = graphprune.serve("out/", replicas=2, max_batch_size=8)   # an ONNX folder, an OpenVINO IR, a Triton entry
    y = handle.remote(x).result()                                      # one sample, without the batch axis

Each replica opens one runtime session (ONNX Runtime, or OpenVINO for ``model.xml``); requests are stacked into batches
of up to ``max_batch_size`` by ``serve.batch``. A request is one sample of the model's one input (its shape without the
batch axis); a bad one (wrong shape or type, NaN or infinity, a batch where one sample is expected, a body that is no
array) gets an error that says what was expected, and the replica goes on serving. Over HTTP (``graphprune-cli serve``)
a POST body is JSON (``{"inputs": [...]}`` or a bare nested list) or a ``.npy`` file; the answer is
``{"outputs": [...]}``, or ``{"error": "..."}`` with status 400.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from graphprune.errors import GraphPruneError

NAME = "graphprune"


class BadRequest(ValueError):
    """A request the model cannot take (the message says what it expects)."""


def model_file(path) -> Path:
    """The model file an exported artifact stands for: an ``.onnx`` or ``.xml`` file, a folder holding ``model.xml`` or
    ``model.onnx``, or a Triton repository entry (``NAME/config.pbtxt`` and ``NAME/<version>/model.onnx``)."""
    path = Path(path)
    if path.is_file() and path.suffix in (".onnx", ".xml"):
        return path
    if path.is_dir():
        for candidate in (path / "model.xml", path / "model.onnx"):
            if candidate.is_file():
                return candidate
        versions = sorted((p for p in path.iterdir() if p.is_dir() and p.name.isdigit() and (p / "model.onnx").is_file()),
                          key=lambda p: int(p.name))
        if versions and (path / "config.pbtxt").is_file():
            return versions[-1] / "model.onnx"
    raise GraphPruneError(f"{path} is not an exported model: give an .onnx or .xml file, a folder with model.onnx or "
                          "model.xml (graphprune.optimize(..., target='onnx' or 'openvino')), or a Triton repository "
                          "entry (target='triton')")


class Runtime:
    """One session of the model file: its one input's name, per-sample shape and type, and a batched run."""

    def __init__(self, file: Path):
        file = Path(file)
        if file.suffix == ".xml":
            from graphprune.exporters.openvino import OpenVinoModel

            self.compiled = OpenVinoModel(file).compiled
            port = self.compiled.inputs
            if len(port) != 1:
                raise GraphPruneError(f"serve takes models of one input; {file} has {len(port)}")
            shape = port[0].get_partial_shape()
            self.shape = tuple(int(d.get_length()) if d.is_static else None for d in list(shape)[1:])
            self.dtype = np.dtype(port[0].get_element_type().to_dtype())
            self._run = lambda x: self.compiled([x])[self.compiled.outputs[0]]
        else:
            from graphprune.exporters.onnx import OnnxModel

            session = OnnxModel(file).session
            inputs = session.get_inputs()
            if len(inputs) != 1:
                raise GraphPruneError(f"serve takes models of one input; {file} has {len(inputs)}")
            self.shape = tuple(d if isinstance(d, int) else None for d in inputs[0].shape[1:])
            self.dtype = np.dtype({"tensor(float)": np.float32, "tensor(float16)": np.float16,
                                   "tensor(double)": np.float64, "tensor(int64)": np.int64}[inputs[0].type])
            name = inputs[0].name
            self._run = lambda x: session.run(None, {name: x})[0]

    def check(self, x) -> np.ndarray:
        """One sample as the model takes it, or :class:`BadRequest` saying why not."""
        try:
            x = np.asarray(x)
        except (ValueError, TypeError) as err:
            raise BadRequest(f"the request is not an array: {err}") from None
        if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
            raise BadRequest(f"the request must be numbers ({self.dtype}), got {x.dtype}")
        expected = "×".join("?" if d is None else str(d) for d in self.shape)
        if x.ndim != len(self.shape) or any(d is not None and d != n for d, n in zip(self.shape, x.shape)):
            more = " (one sample per request: leave out the batch axis)" if x.ndim == len(self.shape) + 1 else ""
            raise BadRequest(f"one sample has shape {expected}, got {'×'.join(map(str, x.shape))}{more}")
        if np.issubdtype(self.dtype, np.floating) and not np.isfinite(x).all():
            raise BadRequest("the request holds NaN or infinity")
        return x.astype(self.dtype, copy=False)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self._run(np.ascontiguousarray(batch)))


def parse_body(body: bytes, content_type: str | None):
    """The array in an HTTP body: ``.npy`` bytes, or JSON (``{"inputs": ...}`` or a bare nested list)."""
    if body[:6] == b"\x93NUMPY" or (content_type or "").startswith("application/octet-stream"):
        try:
            return np.load(io.BytesIO(body), allow_pickle=False)
        except (ValueError, OSError) as err:
            raise BadRequest(f"the body is not a .npy array: {err}") from None
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest("the body is neither JSON ({\"inputs\": [...]}) nor a .npy array") from None
    return data.get("inputs") if isinstance(data, dict) else data


def deployment(max_batch_size: int, batch_wait_timeout_s: float):
    """The Ray Serve deployment class (Ray is imported only when serving)."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    @serve.deployment(name=NAME)
    class Model:
        def __init__(self, file: str):
            self.runtime = Runtime(Path(file))
            self.predict.set_max_batch_size(max_batch_size)
            self.predict.set_batch_wait_timeout_s(batch_wait_timeout_s)

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
        async def predict(self, samples: list[np.ndarray]) -> list[np.ndarray]:
            out = self.runtime(np.stack(samples))
            return list(out)

        async def __call__(self, request):
            if isinstance(request, Request):  # HTTP: a clear 400 for a bad body, the replica goes on
                try:
                    x = self.runtime.check(parse_body(await request.body(), request.headers.get("content-type")))
                except BadRequest as err:
                    return JSONResponse({"error": str(err)}, status_code=400)
                return JSONResponse({"outputs": (await self.predict(x)).tolist()})
            return await self.predict(self.runtime.check(request))

    return Model


def serve(path, replicas: int = 1, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01,
          num_cpus: float = 1.0, port: int | None = None, host: str = "127.0.0.1"):
    """Deploy the exported model at ``path`` on Ray Serve (starting Ray here if it is not running) with ``replicas``
    replicas of ``num_cpus`` CPUs each and dynamic batching up to ``max_batch_size``; returns the deployment handle
    (``handle.remote(sample).result()``). ``port``: also over HTTP at ``http://host:port/``.
    ``graphprune.serving.shutdown()`` stops it (and Ray)."""
    if replicas < 1 or max_batch_size < 1:
        raise GraphPruneError("replicas and max_batch_size must be at least 1")
    file = model_file(path)
    Runtime(file)  # (fails here, with the reason, if the model cannot be served)
    try:
        from ray import serve as ray_serve
    except ImportError:
        raise GraphPruneError("serving needs Ray Serve: pip install 'ray[serve]' (or graphprune[serve])") from None
    if port is not None:
        ray_serve.start(http_options={"host": host, "port": port})
    app = deployment(max_batch_size, batch_wait_timeout_s).options(
        num_replicas=replicas, ray_actor_options={"num_cpus": num_cpus}).bind(str(file.resolve()))
    return ray_serve.run(app, name=NAME, route_prefix="/")


def shutdown() -> None:
    """Stop Ray Serve and the Ray runtime this process started."""
    import ray
    from ray import serve as ray_serve

    ray_serve.shutdown()
    ray.shutdown()
