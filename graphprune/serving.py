"""Serving an exported model on Ray Serve: replicas, dynamic batching, over Python handles and HTTP.

    handle = graphprune.serve("out/", replicas=2, max_batch_size=8)   # an ONNX folder, an OpenVINO IR, a Triton entry
    y = handle.remote(x).result()                                      # one sample, without the batch axis

Each replica opens one runtime session (ONNX Runtime, or OpenVINO for ``model.xml``); requests are stacked into batches
of up to ``max_batch_size`` by ``serve.batch``. A request is one sample (the model's input without the batch axis; for
a model of several inputs, such as a text encoder's ids and mask, a mapping from each input's name to its sample).
Samples of a symbolic length (a text encoder exported with ``lengths=``) may differ in length: those of one length run
as one batch, so each answer equals the sample run alone. A bad request (wrong shape, type or input names, NaN or
infinity, a batch where one sample is expected, a body that is no array) gets an error that says what was expected,
and the replica goes on serving. Over HTTP (``graphprune-cli serve``) a POST body is JSON (``{"inputs": [...]}``, a bare
nested list, or ``{"inputs": {"input_ids": [...], "attention_mask": [...]}}``) or a ``.npy`` file (``.npz`` with one
array per input name); the answer is ``{"outputs": [...]}``, or ``{"error": "..."}`` with status 400.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graphprune.errors import GraphPruneError, first_line

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


@dataclass(frozen=True)
class Port:
    """One input of the model: its name, its shape without the batch axis (``None``: any size) and its type."""

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype

    def sample(self, x, label: str = "") -> np.ndarray:
        """``x`` as one sample of this input, or :class:`BadRequest` saying why not (``label``: the input's name,
        where the model has several)."""
        try:
            x = np.asarray(x)
        except (ValueError, TypeError) as err:
            raise BadRequest(f"{label}the request is not an array: {err}") from None
        if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
            raise BadRequest(f"{label}the request must be numbers ({self.dtype}), got {x.dtype}")
        expected = "×".join("?" if d is None else str(d) for d in self.shape)
        if x.ndim != len(self.shape) or any(d is not None and d != n for d, n in zip(self.shape, x.shape)):
            more = " (one sample per request: leave out the batch axis)" if x.ndim == len(self.shape) + 1 else ""
            raise BadRequest(f"{label}one sample has shape {expected}, got {'×'.join(map(str, x.shape))}{more}")
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            raise BadRequest(f"{label}the request holds NaN or infinity")
        if np.issubdtype(self.dtype, np.integer) and np.issubdtype(x.dtype, np.floating) and (x != np.round(x)).any():
            raise BadRequest(f"{label}the request must be whole numbers ({self.dtype})")
        return x.astype(self.dtype, copy=False)


class Runtime:
    """One session of the model file: its inputs (:class:`Port`) and a batched run."""

    def __init__(self, file: Path):
        file = Path(file)
        if file.suffix == ".xml":
            from graphprune.exporters.openvino import OpenVinoModel

            compiled = OpenVinoModel(file).compiled
            self.inputs = [Port(port.get_any_name(), tuple(int(d.get_length()) if d.is_static else None
                                                           for d in list(port.get_partial_shape())[1:]),
                                np.dtype(port.get_element_type().to_dtype())) for port in compiled.inputs]
            self._run = lambda arrays: compiled(list(arrays))[compiled.outputs[0]]
        else:
            from graphprune.exporters.onnx import OnnxModel

            session = OnnxModel(file).session
            types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                     "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}
            self.inputs = [Port(i.name, tuple(d if isinstance(d, int) else None for d in i.shape[1:]),
                                np.dtype(types[i.type])) for i in session.get_inputs()]
            names = [p.name for p in self.inputs]
            self._run = lambda arrays: session.run(None, dict(zip(names, arrays)))[0]

    def check(self, request) -> tuple[np.ndarray, ...]:
        """One sample as the model takes it (an array for a model of one input; for several, a mapping from each
        input's name to its array), or :class:`BadRequest` saying why not."""
        if len(self.inputs) == 1 and not isinstance(request, Mapping):
            return (self.inputs[0].sample(request),)
        names = [p.name for p in self.inputs]
        if not isinstance(request, Mapping):
            raise BadRequest(f"the model takes {len(names)} inputs: send them by name, {{{', '.join(names)}}}")
        missing, unknown = [n for n in names if n not in request], [str(n) for n in request if n not in names]
        if missing or unknown:
            raise BadRequest(f"the model's inputs are {', '.join(names)}"
                             + (f"; missing {', '.join(missing)}" if missing else "")
                             + (f"; not inputs of the model: {', '.join(unknown)}" if unknown else ""))
        label = len(names) > 1
        return tuple(p.sample(request[p.name], f"{p.name}: " if label else "") for p in self.inputs)

    def __call__(self, samples: list[tuple[np.ndarray, ...]]) -> list:
        """Each checked sample's output: samples of the same shapes run stacked as one batch (those of other lengths
        in batches of their own, so each equals its run alone); where the runtime refuses a batch, its samples get a
        :class:`BadRequest` instead."""
        groups: dict[tuple, list[int]] = {}
        for i, sample in enumerate(samples):
            groups.setdefault(tuple(a.shape for a in sample), []).append(i)
        outputs: list = [None] * len(samples)
        for members in groups.values():
            arrays = [np.ascontiguousarray(np.stack([samples[i][k] for i in members])) for k in range(len(self.inputs))]
            try:
                result = np.asarray(self._run(arrays))
            except Exception as err:  # noqa: BLE001 (the runtime's own refusal, e.g. inputs of unequal lengths)
                for i in members:
                    outputs[i] = BadRequest(f"the model could not run this request: {first_line(err)}")
            else:
                for row, i in enumerate(members):
                    outputs[i] = result[row]
        return outputs


def parse_body(body: bytes, content_type: str | None):
    """The request in an HTTP body: ``.npy`` bytes (``.npz`` for a model of several inputs, one array per input
    name), or JSON (``{"inputs": ...}`` or a bare nested list; ``{"inputs": {"name": [...], ...}}`` for several)."""
    if body[:6] == b"\x93NUMPY" or body[:2] == b"PK" or (content_type or "").startswith("application/octet-stream"):
        try:
            data = np.load(io.BytesIO(body), allow_pickle=False)
            if isinstance(data, np.lib.npyio.NpzFile):
                with data:
                    return {name: data[name] for name in data.files}
            return data
        except (ValueError, OSError, zipfile.BadZipFile) as err:
            raise BadRequest(f"the body is not a .npy array (or .npz of them): {err}") from None
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
        async def predict(self, samples: list[tuple[np.ndarray, ...]]) -> list:
            return self.runtime(samples)

        async def run(self, request) -> np.ndarray:
            out = await self.predict(self.runtime.check(request))
            if isinstance(out, BadRequest):
                raise out
            return out

        async def __call__(self, request):
            if isinstance(request, Request):  # HTTP: a clear 400 for a bad body, the replica goes on
                try:
                    out = await self.run(parse_body(await request.body(), request.headers.get("content-type")))
                except BadRequest as err:
                    return JSONResponse({"error": str(err)}, status_code=400)
                return JSONResponse({"outputs": out.tolist()})
            return await self.run(request)

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
