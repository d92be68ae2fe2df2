"""A reduced diffusion denoiser (:mod:`graphprune.diffusion`) as one ONNX graph per denoising step, checked in ONNX
Runtime at two timesteps before anything is written.

The graph's inputs are the denoiser's tensor inputs (batch dynamic; static for Flux, whose reduced attention runs each
sample apart at its merged tokens' rotary positions) and, with ``use_rand``, one ``cells_K`` per
reduced block call: the destination's slot in each cell (int64, ``[rows, cols]``), drawn outside the graph.
:class:`OnnxDenoiser` draws them as the eager model does (its own generator, top-left cells for an odd batch).
"""

from __future__ import annotations

import contextlib
import gc
from functools import partial
import io
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch.export import Dim

from graphprune.diffusion.denoiser import Draws, ReducedDenoiser, per_sample
from graphprune.diffusion.merge import Grid, draw_cells
from graphprune.errors import ExportError, GraphPruneError, first_line
from graphprune.exporters import triton
from graphprune.exporters.files import publish, staging_dir
from graphprune.exporters.onnx import OPSET, TOLERANCE, _quiet_loggers, _session
from graphprune.exporters.openvino import OpenVinoModel, export_openvino
from graphprune.exporters.ort_attention import fuse_attention
from graphprune.exporters.trt import write_trt_build
from graphprune.report import max_abs_diff

META = "denoiser.json"
ORT_GRAPH = "denoiser.ort.onnx"  # the graph with ONNX Runtime's fused attention, beside the portable one


class _Step(torch.nn.Module):
    """One denoising step with named tensor inputs and the cells as inputs; other arguments fixed. ``expose``: it also
    returns each reduced block call's matching (order, choice), for the parity check (the published graph's outputs
    are then cut back to the first)."""

    def __init__(self, reduced: ReducedDenoiser, names: list[str], fixed: dict, size: tuple[int, int],
                 expose: bool = False):
        super().__init__()
        self.reduced, self.names, self.fixed, self.size, self.expose = reduced, names, fixed, size, expose

    def run(self, tensors: list[torch.Tensor], cells: list[torch.Tensor], decided=None) -> tuple[torch.Tensor, Draws]:
        kwargs = {**self.fixed, **dict(zip(self.names, tensors)), "return_dict": False}
        draws = Draws(given=list(cells) if cells else None, decided=decided)
        return self.reduced.call((), kwargs, draws, self.size)[0], draws

    def forward(self, tensors: list[torch.Tensor], cells: list[torch.Tensor]):
        out, draws = self.run(tensors, cells)
        return (out, *[t for m in draws.merges for t in (m.order, m.choice)]) if self.expose else out


def _step(reduced: ReducedDenoiser, example_inputs: dict, expose: bool = False) -> _Step:
    """The step module for ``example_inputs`` (the token grid fixed at theirs)."""
    names, _, fixed = _split(example_inputs)
    return _Step(reduced, names, fixed, reduced.latent_size((), example_inputs), expose).eval()


def _check(run, step: _Step, inputs: list[torch.Tensor], cells: list[torch.Tensor]) -> tuple[float, float, int]:
    """Run the exposed graph (``run``: its inputs to its outputs, the output then each block call's order and choice)
    and eager with the graph's own matchings: (the largest output difference, how far the graph's matchings are from
    optimal under eager's scores, at how many block calls eager would have merged other tokens: near-ties that the two
    runtimes' rounding decides apart)."""
    got = run([*inputs, *cells])
    with torch.no_grad():
        replayed, draws = step.run(inputs, cells, list(zip(got[1::2], got[2::2])))
    slack = max((m.slack for m in draws.merges), default=0.0)
    return max_abs_diff(got[0], replayed), slack, sum(m.differs for m in draws.merges)


def _checked(run, step: _Step, example_inputs: dict, cells: list[torch.Tensor], runtime: str) -> dict:
    """The exposed graph checked at the example's timestep and at half of it (``_check``); an ExportError if it
    differs from eager with its own matchings or its matchings are not optimal under eager's similarities."""
    names, tensors, _ = _split(example_inputs)
    t = example_inputs["timestep"]
    checks = [_check(run, step, [when if k == "timestep" else v for k, v in zip(names, tensors)], cells)
              for when in (t, torch.div(t, 2, rounding_mode="floor"))]  # (the timestep's dtype kept)
    diff, slack, apart = max(c[0] for c in checks), max(c[1] for c in checks), sum(c[2] for c in checks)
    if not diff <= TOLERANCE:
        raise ExportError(f"the {runtime} denoiser differs from the eager one (with the same matchings) by {diff:.3g} "
                          f"(> {TOLERANCE}); nothing was written")
    if not slack <= TOLERANCE:
        raise ExportError(f"the {runtime} denoiser's matchings are {slack:.3g} from optimal under eager's similarities "
                          f"(> {TOLERANCE}): its matching differs from the published one; nothing was written")
    return {"max_abs_diff": diff, "matching_slack": slack, "near_ties": apart}


def _trace(reduced: ReducedDenoiser, inputs: dict) -> tuple[list[Grid], int]:
    """The grid of every reduced block call, in call order, and how many block calls merge (one eager run that records
    its draws)."""
    draws = Draws(torch.Generator().manual_seed(0))
    with torch.no_grad():
        reduced.call((), {**inputs, "return_dict": False}, draws)
    return [g for g, _ in draws.log], len(draws.merges)


def _split(example_inputs: dict) -> tuple[list[str], list[torch.Tensor], dict]:
    """(the names of the tensor inputs, those tensors, the other arguments, fixed in the graph)."""
    names = [k for k, v in example_inputs.items() if isinstance(v, torch.Tensor)]
    return names, [example_inputs[k] for k in names], {k: v for k, v in example_inputs.items() if k not in names}


def _check_cells(grids: list[Grid]) -> list[torch.Tensor]:
    """The cells the parity checks use: drawn from one generator seeded 0."""
    gen = torch.Generator().manual_seed(0)
    return [draw_cells(g, gen) for g in grids]


def export_denoiser_onnx(reduced: ReducedDenoiser, example_inputs: dict, output) -> "OnnxDenoiser":
    """Export ``reduced`` called with ``example_inputs`` (the denoiser's keyword arguments; tensors become inputs,
    anything else is fixed) to the folder ``output`` (``denoiser.onnx`` + data + ``denoiser.json``)."""
    if not isinstance(example_inputs, dict) or not example_inputs:
        raise GraphPruneError("exporting a denoiser needs example_inputs={...}: its keyword arguments, e.g. "
                              "{'sample': latents, 'timestep': t, 'encoder_hidden_states': text} for a UNet")
    if callable(reduced.ratio) or isinstance(reduced.ratio, (list, tuple)):
        raise GraphPruneError("an exported denoiser merges one ratio: export with ratio=<number> (one graph per ratio "
                              "for a schedule)")
    if not isinstance(example_inputs.get("timestep"), torch.Tensor):
        raise GraphPruneError("example_inputs needs 'timestep' as a tensor (an input of the graph; the parity check "
                              "runs two timesteps)")
    names, tensors, fixed = _split(example_inputs)
    batch = tensors[0].shape[0] if tensors[0].dim() else None
    static = per_sample(reduced)  # (Flux: each sample's attention runs apart, at its merged tokens' positions)
    if batch is None or (batch < 2 and not static):
        raise GraphPruneError("example_inputs need a batch of at least 2 (the exported batch is dynamic)")
    grids, calls = _trace(reduced, example_inputs)
    grids = grids if reduced.settings.use_rand else []
    step = _step(reduced, example_inputs, expose=True)
    cells = _check_cells(grids)
    b = Dim.AUTO  # (diffusers' UNet branches on a batch of 64 around a no-op: the ONNX graph serves any batch)
    dynamic = ([{0: b} if t.dim() and t.shape[0] == batch and not static else None for t in tensors],
               [None] * len(cells))
    output = Path(output)
    with staging_dir(output) as tmp:
        staged = tmp / "denoiser.onnx"
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                    _quiet_loggers("torch.onnx", "onnx_ir"):
                warnings.simplefilter("ignore")
                program = torch.export.export(step, (tensors, cells), dynamic_shapes=dynamic, strict=False)
                matchings = [f"{k}_{i}" for i in range(calls) for k in ("order", "choice")]
                program = torch.onnx.export(program, dynamo=True,
                                            input_names=[*names, *(f"cells_{i}" for i in range(len(cells)))],
                                            output_names=["output", *matchings], opset_version=OPSET, verbose=False)
                program.save(str(staged), external_data=True)
        except Exception as err:  # noqa: BLE001
            raise ExportError(f"ONNX export of the denoiser failed: {first_line(err)}") from err
        del program  # (its graph and folded weights: a full denoiser's are gigabytes, not needed past the file)
        gc.collect()
        fused = fuse_attention(staged, tmp / ORT_GRAPH)  # (what ONNX Runtime runs: checked as it will run)
        graphs = [staged, tmp / ORT_GRAPH] if fused else [staged]
        session = _session(graphs[-1])

        def run(arrays: list[torch.Tensor]) -> list[torch.Tensor]:
            feeds = {i.name: a.detach().cpu().numpy() for i, a in zip(session.get_inputs(), arrays)}
            return [torch.from_numpy(np.asarray(o)) for o in session.run(None, feeds)]

        checked = _checked(run, step, example_inputs, cells, "ONNX")
        del session
        for path in graphs:
            graph = onnx.load(str(path), load_external_data=False)  # (the matchings were outputs for the check only)
            del graph.graph.output[1:]
            onnx.save(graph, str(path))
        meta = {"inputs": names, "batch": batch if static else None,
                "cells": [[g.h, g.w, g.sx, g.sy] for g in grids], "ratio": reduced.ratio,
                "seed": reduced.seed, **checked, "checked_calls": 2 * calls, "fused_attention": fused}
        (tmp / META).write_text(json.dumps(meta, indent=2))
        publish(sorted(tmp.iterdir()), output, last=staged)
    return OnnxDenoiser(output)


class _Runner:
    """A denoiser exported to ``folder``: called with the same keyword tensors, draws the cells as the eager reduced
    denoiser does (``seed``: as its recipe's; top-left cells for an odd batch). Returns the predicted noise (the
    output's ``sample``)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / META).read_text())
        self.grids = [Grid(*g) for g in self.meta["cells"]]
        self.generator = torch.Generator()
        if self.meta["seed"] is not None:
            self.generator.manual_seed(self.meta["seed"])
        self.max_abs_diff = self.meta["max_abs_diff"]

    def feeds(self, inputs: dict) -> dict:
        missing = [k for k in self.meta["inputs"] if k not in inputs]
        if missing:
            raise GraphPruneError(f"missing input(s) {', '.join(missing)}; the graph takes {', '.join(self.meta['inputs'])}")
        batch = inputs[self.meta["inputs"][0]].shape[0]
        if self.meta.get("batch") not in (None, batch):
            raise GraphPruneError(f"this denoiser was exported for a batch of {self.meta['batch']} (a reduced Flux step "
                                  f"runs each sample apart), not {batch}: export again with that batch")
        gen = self.generator if batch % 2 == 0 else None
        cells = [draw_cells(g, gen) for g in self.grids]
        feeds = {k: torch.as_tensor(inputs[k]).cpu().numpy() for k in self.meta["inputs"]}
        feeds.update({f"cells_{i}": c.numpy() for i, c in enumerate(cells)})
        return feeds

    def __call__(self, **inputs) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.run(self.feeds(inputs))))


class OnnxDenoiser(_Runner):
    """The exported denoiser in ONNX Runtime: its copy with fused attention (``denoiser.ort.onnx``, see
    :mod:`graphprune.exporters.ort_attention`) where the export wrote one, else ``denoiser.onnx``."""

    def __init__(self, folder, threads: int | None = None, release_memory: bool = False):
        """``release_memory``: hand the step's working memory back after each call (ONNX Runtime keeps it for the next
        call otherwise: gigabytes for SD 1.5 at 1024², for each denoiser held)."""
        super().__init__(folder)
        fused = self.folder / ORT_GRAPH
        self.session = _session(fused if fused.exists() else self.folder / "denoiser.onnx", threads)
        self.options = None
        if release_memory:
            import onnxruntime as ort

            self.options = ort.RunOptions()
            self.options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def run(self, feeds: dict) -> np.ndarray:
        return self.session.run(None, feeds, self.options)[0]


class OpenVinoDenoiser(_Runner):
    """The exported denoiser as an OpenVINO IR compiled for the CPU (``denoiser.xml`` + ``.bin``)."""

    def __init__(self, folder):
        super().__init__(folder)
        self.model = OpenVinoModel(self.folder / "denoiser.xml")

    def run(self, feeds: dict) -> np.ndarray:
        return self.model.compiled([feeds[i.get_any_name()] for i in self.model.compiled.inputs])[0]


def deploy_denoiser(reduced: ReducedDenoiser, example_inputs: dict, output, target: str):
    """``target="openvino"``: the checked ONNX denoiser converted to an OpenVINO IR, compiled and checked (≤ 1e-4) before
    it is written; ``"trt"``: the checked ONNX denoiser plus its TensorRT engine build (built only where TensorRT
    imports); ``"triton"``, ``output="repo/NAME"``: a Triton model repository entry (no server-side batching: the
    cells are one draw per call). Returns the runner (ONNX Runtime for trt and triton)."""
    if target == "triton":
        onnx_path, model_dir = triton.model_folder(output)
        folder = onnx_path.parent
    else:
        folder = Path(output)
    onnx_runner = export_denoiser_onnx(reduced, example_inputs, folder)
    written = [folder / name for name in ("denoiser.onnx", "denoiser.onnx.data", ORT_GRAPH, META)]
    try:
        if target == "openvino":  # checked as the ONNX graph is: with its own matchings (exposed again by name)
            cells = _check_cells(onnx_runner.grids)
            matchings = [f"{k}_{i}" for i in range(onnx_runner.meta["checked_calls"] // 2) for k in ("order", "choice")]
            check = partial(_checked, step=_step(reduced, example_inputs), example_inputs=example_inputs, cells=cells,
                            runtime="OpenVINO")
            export_openvino(folder / "denoiser.onnx", [], exposed=matchings, check=check)
            return OpenVinoDenoiser(folder)
        if target == "trt":
            shapes = {i.name: tuple(t.shape) for i, t in zip(onnx_runner.session.get_inputs(), _split(example_inputs)[1])}
            cells = {f"cells_{i}": g.cells for i, g in enumerate(onnx_runner.grids)}
            static = set(shapes) if onnx_runner.meta.get("batch") else set()  # (Flux: every shape fixed)
            onnx_runner.build = write_trt_build(folder / "denoiser.onnx", {**shapes, **cells},
                                                fixed=set(cells) | static)
            return onnx_runner
        if target == "triton":
            triton.write_config(onnx_runner, model_dir, max_batch_size=0, filename="denoiser.onnx")
            return onnx_runner
    except Exception:
        for path in written:
            path.unlink(missing_ok=True)  # (nothing half-written stays behind)
        raise
    raise GraphPruneError(f"unknown deployment target {target!r}")
