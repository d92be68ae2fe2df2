"""Measure what a recipe buys and costs: speed against the unmodified model, and fidelity to it.

    from graphprune.bench import bench, sweep
    result = bench(model, "tome", inputs=(x,), r=13)              # one setting
    results = sweep(model, [("tome", {"r": r}) for r in (4, 8, 12)], inputs=(x,))

Speed: the unmodified model and every optimized variant run on the same runtime (eager, or
ONNX Runtime for ``target="onnx"``, OpenVINO on the CPU for ``target="openvino"``), interleaved round by round in a rotating order after
warm-up; a variant's speedup is the ratio of medians against the baseline of the same
rounds. Fidelity: the variant's outputs against the unmodified eager model's on the same
data (``data``: batches of inputs; default: the timing batch): the cosine similarity of
features, and for logits the KL divergence, top-1 agreement and, with ``labels``, accuracy.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import math
import statistics
import tempfile
import time
import warnings
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from graphprune.capture import eval_mode, first_two
from graphprune.errors import GraphPruneError

TARGETS = ("eager", "onnx", "openvino")


# --------------------------------------------------------------------------------------------
# timing and memory
# --------------------------------------------------------------------------------------------


def clock() -> float:
    """``time.perf_counter()`` once the GPU's queued kernels have run (a CUDA call returns before they do); on a
    process that never used CUDA, plain ``perf_counter``."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def interleaved(fns: dict, inputs: tuple, rounds: int = 10, warmup: int = 2, progress=None) -> dict[str, list[float]]:
    """Seconds per call of every function in ``fns``: ``rounds`` rounds, each running all of them once
    in a rotating order (so drift and contention hit every variant alike), after ``warmup`` rounds."""
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    task = progress.add_task("timing", total=warmup + rounds) if progress is not None else None
    with torch.inference_mode():
        for i in range(warmup + rounds):
            for k in names[i % len(names):] + names[: i % len(names)]:
                t0 = clock()
                fns[k](*inputs)
                if i >= warmup:
                    times[k].append(clock() - t0)
            if task is not None:
                progress.advance(task)
    return times


class _LiveBytes(TorchDispatchMode):
    """Bytes of tensor storage created inside the mode and still alive; ``peak`` is the maximum."""

    def __init__(self, existing: frozenset = frozenset()):
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()
        self._existing = existing  # storages allocated before: a view or alias of one costs nothing

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and key not in self._seen and key not in self._existing:
                    self._seen.add(key)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, nbytes)
        return out


def _is_tensor(obj) -> bool:
    try:
        return isinstance(obj, torch.Tensor)
    except ReferenceError:  # a weakref.proxy whose object is gone (isinstance reads its __class__)
        return False


def _cpu_storages() -> frozenset:
    """Addresses of the CPU tensor storages alive now (inputs, weights, caches)."""
    found = set()
    with warnings.catch_warnings():  # isinstance on some foreign objects warns (deprecated attributes)
        warnings.simplefilter("ignore")
        objects = [o for o in gc.get_objects() if _is_tensor(o)]
    for obj in objects:
        if obj.device.type == "cpu" and not obj.is_sparse:
            try:
                found.add(obj.untyped_storage().data_ptr())
            except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. functional wrappers)
                pass
    return frozenset(found)


def peak_memory(fn: Callable, inputs: tuple) -> int:
    """Peak bytes of the activations one call of ``fn`` allocates (weights and inputs excluded).

    CUDA: the allocator's peak above what was allocated before the call. CPU: the peak of the
    live bytes of every tensor storage the call creates, tracked op by op (views and aliases
    of storages that existed before, such as an input sliced from a larger tensor, cost nothing).
    """
    cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in pytree.tree_leaves(inputs))
    with torch.inference_mode():
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            out = fn(*inputs)
            torch.cuda.synchronize()
            del out
            return torch.cuda.max_memory_allocated() - before
        mode = _LiveBytes(_cpu_storages())
        with mode:
            out = fn(*inputs)
        del out
        return mode.peak


# --------------------------------------------------------------------------------------------
# fidelity
# --------------------------------------------------------------------------------------------


def primary_output(out) -> torch.Tensor:
    """The tensor fidelity is measured on: the output itself, or the first tensor of a tuple /
    ``ModelOutput`` (``logits`` or ``last_hidden_state``)."""
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    if not leaves:
        raise GraphPruneError("the model returned no tensor to measure fidelity on")
    return leaves[0]


PER_SAMPLE = ("cosine", "top1_agreement")


def per_sample(reference: torch.Tensor, output: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """One value per sample (first axis): the cosine along the last axis averaged over the
    sample's other axes, or the top-1 agreement of logits (1 or 0)."""
    ref, out = reference.detach().float(), output.detach().float()
    if metric == "top1_agreement":
        return (ref.argmax(-1) == out.argmax(-1)).float().reshape(ref.shape[0], -1).mean(1)
    cos = F.cosine_similarity(ref, out, dim=-1)
    return cos.reshape(cos.shape[0], -1).mean(1) if cos.dim() else cos.reshape(1)


def fidelity(reference: torch.Tensor, output: torch.Tensor, logits: bool = False, labels=None) -> dict:
    """How close ``output`` is to ``reference`` (same shape).

    ``cosine``: cosine similarity along the last axis, averaged over everything else (samples,
    and tokens of per-token outputs). With ``logits`` (shape (B, classes)): ``kl`` = mean
    KL(softmax(reference) ‖ softmax(output)), ``top1_agreement``; with ``labels`` also
    ``accuracy`` and ``baseline_accuracy``.
    """
    ref, out = reference.detach().float(), output.detach().float()
    if ref.shape != out.shape:
        raise GraphPruneError(f"outputs differ in shape: {tuple(out.shape)} vs the unmodified model's {tuple(ref.shape)}; "
                              "measure fidelity on per-sample outputs (features, logits) or keep restore_tokens on")
    result = {"cosine": float(per_sample(ref, out).mean())}
    if logits:
        if ref.dim() != 2:
            raise GraphPruneError(f"logits must be (batch, classes), got {tuple(ref.shape)}")
        logp_ref, logp = ref.log_softmax(-1), out.log_softmax(-1)
        result["kl"] = float(F.kl_div(logp, logp_ref, log_target=True, reduction="batchmean"))
        result["top1_agreement"] = float((ref.argmax(-1) == out.argmax(-1)).float().mean())
        if labels is not None:
            labels = torch.as_tensor(labels).reshape(-1)
            result["accuracy"] = float((out.argmax(-1) == labels).float().mean())
            result["baseline_accuracy"] = float((ref.argmax(-1) == labels).float().mean())
    return result


def is_classifier(model: torch.nn.Module) -> bool:
    """Whether the model's primary output is class logits (timm with a head, HF ``*ForImageClassification``)."""
    if getattr(model, "num_classes", 0):
        return True
    return type(model).__name__.endswith(("ForImageClassification", "ForSequenceClassification"))


def as_args(x) -> tuple:
    """Model arguments as a tuple: a tensor becomes a 1-tuple."""
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


def outputs(fn: Callable, data: Sequence[tuple], output_fn: Callable = primary_output) -> torch.Tensor:
    """``output_fn`` of ``fn`` on every batch of ``data``, concatenated (inference mode)."""
    with torch.inference_mode():
        return torch.cat([output_fn(fn(*d)) for d in data])


# --------------------------------------------------------------------------------------------
# bench and sweep
# --------------------------------------------------------------------------------------------


@dataclass
class BenchResult:
    """One variant against the unmodified model, measured in the same interleaved rounds."""

    recipe: str
    options: dict
    target: str
    batch: int
    baseline_ms: float
    latency_ms: float
    speedup: float
    throughput: float  # samples per second
    baseline_throughput: float
    flop_ratio: float
    tokens_per_block: list
    fidelity: dict = field(default_factory=dict)
    peak_memory_mb: Optional[float] = None
    baseline_peak_memory_mb: Optional[float] = None
    prefill_ms: Optional[float] = None  # decoders: the prompt pass (time to first token; vision tower included)
    baseline_prefill_ms: Optional[float] = None
    compiled: bool = False  # both sides ran through torch.compile

    @property
    def label(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.recipe}({opts})" if opts else self.recipe

    def to_dict(self) -> dict:
        return {"label": self.label, **asdict(self)}


def _batch_of(inputs: tuple) -> int:
    first = next((t for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)), None)
    return int(first.shape[0]) if first is not None and first.dim() else 1


@contextlib.contextmanager
def _progress(enabled: bool):
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=True) as progress:
        yield progress


def sweep(
    model: torch.nn.Module,
    variants: Sequence[tuple[str, dict]],
    inputs,
    *,
    target: str = "eager",
    data: Optional[Iterable] = None,
    labels=None,
    output_fn: Optional[Callable] = None,
    logits: Optional[bool] = None,
    rounds: int = 10,
    warmup: int = 2,
    memory: bool = True,
    threads: Optional[int] = None,
    progress: bool = True,
    workdir=None,
    compile: bool = False,  # noqa: A002
) -> list[BenchResult]:
    """Benchmark several (recipe, options) variants against one baseline, all interleaved.

    ``inputs``: the timing batch (a tensor or a tuple of model arguments). ``data``: batches
    (tuples of arguments) for fidelity, default ``[inputs]``; ``labels``: their labels, concatenated.
    ``output_fn`` maps a model output to the tensor compared (default :func:`primary_output`);
    ``logits`` says whether that tensor is class logits (default: guessed from the model). ``compile``: the
    unmodified model and every variant run through ``torch.compile`` (eager target; compiled in the warm-up rounds,
    at least one).
    """
    import graphprune

    if target not in TARGETS:
        raise GraphPruneError(f"unknown bench target '{target}'; choose one of {', '.join(TARGETS)}")
    if not variants:
        raise GraphPruneError("nothing to benchmark: give at least one (recipe, options) variant")
    if compile and target != "eager":
        raise GraphPruneError(f"compile applies to target='eager' (torch.compile), not '{target}'")
    for recipe, options in variants:
        graphprune.recipes.get_recipe(recipe, **options)  # unknown recipe / bad options: fail before any work
    inputs = as_args(inputs)
    data = [inputs] if data is None else [as_args(d) for d in data]
    output_fn = output_fn or primary_output
    logits = is_classifier(model) if logits is None else logits
    if threads is not None:
        torch.set_num_threads(threads)
    with eval_mode(model):  # the user's model is switched to eval for the run, its flags restored after
        return _sweep(model, variants, inputs, target, data, labels, output_fn, logits, rounds,
                      max(warmup, 1) if compile else warmup, memory, progress, workdir, compile)


def _sweep(model, variants, inputs, target, data, labels, output_fn, logits, rounds, warmup, memory, progress, workdir,
           compile=False):  # noqa: A002
    import graphprune

    example = first_two(inputs)
    reference = outputs(model, data, output_fn)
    with contextlib.ExitStack() as stack, _progress(progress) as bar:
        tmp = Path(workdir) if workdir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="graphprune-bench-")))
        build = bar.add_task("optimizing", total=len(variants)) if bar is not None else None
        runners, reports = {}, []
        baseline = model
        if target != "eager":  # the unmodified model on the same runtime: exported through graphprune at zero reduction
            baseline = graphprune.optimize(model, "tome", target=target, output=tmp / "baseline" / "model.onnx",
                                           example_inputs=example, r=0)
        for i, (recipe, options) in enumerate(variants):
            if target != "eager":
                runner = graphprune.optimize(model, recipe, target=target, output=tmp / f"variant{i}" / "model.onnx",
                                             example_inputs=example, **options)
            else:
                runner = graphprune.optimize(model, recipe, example_inputs=example, **options)
            runners[i] = runner
            reports.append(runner.report)
            if bar is not None:
                bar.advance(build)
        if compile:  # compiled reduced against compiled unmodified (compilation happens in the warm-up rounds)
            baseline, runners = torch.compile(model), {i: torch.compile(r) for i, r in runners.items()}
        fns = {"baseline": baseline, **runners}
        times = interleaved(fns, inputs, rounds=rounds, warmup=warmup, progress=bar)

    batch = _batch_of(inputs)
    base_s = statistics.median(times["baseline"])
    base_mem = peak_memory(model, inputs) if memory and target == "eager" else None
    results = []
    for i, (recipe, options) in enumerate(variants):
        runner, report = runners[i], reports[i]
        fid = fidelity(reference, outputs(runner, data, output_fn), logits=logits, labels=labels)
        t = statistics.median(times[i])
        mem = peak_memory(runner, inputs) if memory and target == "eager" else None
        results.append(BenchResult(
            recipe=recipe, options=dict(options), target=target, batch=batch, baseline_ms=base_s * 1e3, latency_ms=t * 1e3,
            speedup=base_s / t, throughput=batch / t, baseline_throughput=batch / base_s, flop_ratio=report.flop_ratio,
            tokens_per_block=list(report.tokens_per_block), fidelity=fid,
            peak_memory_mb=None if mem is None else mem / 2**20, baseline_peak_memory_mb=None if base_mem is None else base_mem / 2**20,
            compiled=compile,
        ))
    return results


def bench(model: torch.nn.Module, recipe: str, inputs, **kwargs) -> BenchResult:
    """One recipe setting against the unmodified model; keyword arguments not taken by :func:`sweep`
    are recipe options (``bench(model, "tome", (x,), r=13, target="onnx")``)."""
    keys = set(inspect.signature(sweep).parameters) - {"model", "variants", "inputs"}
    bench_kw = {k: v for k, v in kwargs.items() if k in keys}
    options = {k: v for k, v in kwargs.items() if k not in keys}
    return sweep(model, [(recipe, options)], inputs, **bench_kw)[0]


# --------------------------------------------------------------------------------------------
# sweeps: ranges, the Pareto front, a table and a plot
# --------------------------------------------------------------------------------------------


def parse_range(text: str) -> tuple[str, list]:
    """``"r=0:20:2"`` → ("r", [0, 2, …, 20]); ``"keep=1.0:0.4:0.1"`` → ("keep", [1.0, 0.9, …, 0.4]).

    The stop is included; the step's sign follows start → stop; a comma list (``r=4,8,13``) is
    taken as given. Integers stay integers.
    """
    name, sep, spec = text.partition("=")
    if not sep or not name.strip() or not spec.strip():
        raise GraphPruneError(f"a sweep is NAME=START:STOP:STEP or NAME=V1,V2,…, got '{text}'")
    name = name.strip()

    def number(s: str):
        s = s.strip()
        try:
            return int(s)
        except ValueError:
            try:
                return float(s)
            except ValueError:
                raise GraphPruneError(f"sweep '{text}': '{s}' is not a number") from None

    if ":" not in spec:
        return name, [number(v) for v in spec.split(",") if v.strip()]
    parts = [number(v) for v in spec.split(":")]
    if len(parts) != 3:
        raise GraphPruneError(f"sweep '{text}': a range is START:STOP:STEP")
    start, stop, step = parts
    if step == 0:
        raise GraphPruneError(f"sweep '{text}': the step must not be 0")
    step = abs(step) if stop >= start else -abs(step)
    count = int(math.floor((stop - start) / step + 1e-9)) + 1
    values = [start + i * step for i in range(count)]
    if all(isinstance(v, int) for v in parts):
        return name, values
    digits = max(len(str(v).split(".")[-1]) if isinstance(v, float) else 0 for v in parts)
    return name, [round(float(v), digits) for v in values]


def pareto_front(results: Sequence[BenchResult], metric: str = "cosine") -> list[BenchResult]:
    """The results no other result beats on both speedup and ``metric`` (higher is better), fastest first."""
    front = []
    for r in results:
        s, f = r.speedup, r.fidelity.get(metric, float("nan"))
        dominated = any(o is not r and o.speedup >= s and o.fidelity.get(metric, float("nan")) >= f
                        and (o.speedup > s or o.fidelity.get(metric, float("nan")) > f) for o in results)
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: -r.speedup)


def _cells(r: BenchResult, flops_digits: int) -> list[str]:
    """Latency, speedup, FLOPs, cosine, top-1 agreement, KL and peak memory of one result, as text ("—": not measured)."""
    f = r.fidelity

    def fmt(value, spec):
        return "—" if value is None else format(value, spec)

    return [f"{r.latency_ms:.1f}", f"{r.speedup:.2f}×", f"{r.flop_ratio:.{flops_digits}f}", fmt(f.get("cosine"), ".4f"),
            fmt(f.get("top1_agreement"), ".3f"), fmt(f.get("kl"), ".4f"), fmt(r.peak_memory_mb, ".1f")]


def table(results: Sequence[BenchResult], title: str = "graphprune bench"):
    """A rich table of the results (the Pareto-front rows marked with ★)."""
    from rich.table import Table

    front = {id(r) for r in pareto_front(results)}
    t = Table(title=title)
    for col in ("variant", "ms", "speedup", "FLOPs", "cosine", "top-1", "KL", "peak MB"):
        t.add_column(col, justify="left" if col == "variant" else "right", no_wrap=True)
    for r in results:
        t.add_row(("★ " if id(r) in front else "  ") + r.label, *_cells(r, 2))
    return t


def plot(results: Sequence[BenchResult], path, metric: str = "cosine", title: str = "") -> Path:
    """A PNG of speedup against fidelity, one series per recipe, the Pareto front drawn as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from graphprune.exporters.files import atomic_path

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for recipe in dict.fromkeys(r.recipe for r in results):
        pts = [r for r in results if r.recipe == recipe]
        ax.plot([r.fidelity.get(metric) for r in pts], [r.speedup for r in pts], "o-", alpha=0.8, label=recipe)
    front = sorted(pareto_front(results, metric), key=lambda r: r.fidelity.get(metric))
    ax.plot([r.fidelity.get(metric) for r in front], [r.speedup for r in front], "k--", lw=1, label="Pareto front")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_xlabel(f"fidelity ({metric} to the unmodified model)")
    ax.set_ylabel(f"speedup ({results[0].target}, batch {results[0].batch})" if results else "speedup")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def markdown(results: Sequence[BenchResult], title: str = "graphprune bench") -> str:
    """The results as a Markdown table (Pareto-front rows marked with ★)."""
    front = {id(r) for r in pareto_front(results)}
    lines = [f"### {title}", "", "| variant | latency ms | speedup | FLOPs | cosine | top-1 agreement | KL | peak MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {'★ ' if id(r) in front else ''}`{r.label}` | " + " | ".join(_cells(r, 3)) + " |")
    base = results[0] if results else None
    if base is not None:
        lines += ["", f"Baseline (unmodified model): {base.baseline_ms:.1f} ms per batch of {base.batch}"
                  + (f", peak activations {base.baseline_peak_memory_mb:.1f} MB" if base.baseline_peak_memory_mb is not None else "") + "."]
    return "\n".join(lines) + "\n"
