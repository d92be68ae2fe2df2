"""Latency-aware schedules (SPViT-style): profile the blocks on the target, then search.

1. **Latency table.** Each transformer block of the model is timed on the target (eager
   PyTorch, or ONNX Runtime with the block exported per count) at a set of token counts and the batch size (every (block, count) pair interleaved, min of N), plus
   the whole model at its full token count, so "the rest" (embedding, head) is known too.
   The table is cached on disk per (device, runtime, model, batch).
2. **Prediction.** A schedule's latency = rest + Σ blocks, a block that reduces from n to n'
   tokens after its attention costing the mean of its time at n and n' (attention runs at n,
   the MLP at n'), plus a per-reducing-block correction fitted from one measured schedule
   (calibration): the reduction op's own cost, and whatever bias the table has against the
   whole model running (it may come out negative).
3. **Search.** Candidate per-block schedules from a family (ramps of every slope, late
   starts), each scaled to the latency budget with the table, are scored by their fidelity
   on calibration data (the measure of :mod:`graphprune.bench`); the best is refined by a
   local search on the slope. The constant schedule is one of the candidates, and it is kept
   unless the best candidate beats it by more than the calibration noise (``noise`` standard
   errors of their per-sample difference): a gain the calibration set cannot resolve is not
   taken, since it does not carry over to other data.

Tuned recipe options: ``tome``'s per-block ``r``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import platform
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.utils._pytree as pytree

from graphprune import bench as gb
from graphprune.api import default_example_inputs, optimize
from graphprune.capture import eval_mode, find_block_paths, first_two
from graphprune.errors import GraphPruneError, RecipeError, ScheduleError
from graphprune.exporters.files import write_text
from graphprune.exporters.onnx import OPSET, OnnxModel
from graphprune.recipes import get_recipe
from graphprune.schedule.files import Schedule

TUNABLE = {"tome": "r"}  # recipe → its per-block count option
TARGETS = ("eager", "onnx")


# --------------------------------------------------------------------------------------------
# the latency table
# --------------------------------------------------------------------------------------------


@dataclass
class LatencyTable:
    """Milliseconds of each block at each profiled token count, and of everything else."""

    counts: list[int]  # ascending; the last is the model's full token count
    blocks: list[list[float]]  # blocks[i][j]: block i at counts[j] tokens
    rest_ms: float  # the rewritten (captured) model outside its blocks, at the full token count
    full_ms: float  # the whole unmodified model: the speedup's baseline
    batch: int
    target: str
    device: str
    model: str
    overhead_ms: float = 0.0  # per reducing block, fitted by calibration (reduction cost and table bias; may be < 0)

    def block_ms(self, i: int, n: float) -> float:
        """Block ``i`` at ``n`` tokens: linear interpolation (and extrapolation below the smallest count)."""
        c, t = self.counts, self.blocks[i]
        if n >= c[-1]:
            return t[-1] * n / c[-1]
        j = max(k for k in range(len(c) - 1) if c[k] <= n) if n >= c[0] else 0
        w = (n - c[j]) / (c[j + 1] - c[j])
        return max(t[j] + w * (t[j + 1] - t[j]), 0.0)

    def predict(self, tokens_in: Sequence[int], tokens_out: Sequence[int]) -> float:
        """Milliseconds of the model whose block i takes ``tokens_in[i]`` tokens and passes on ``tokens_out[i]``."""
        total = self.rest_ms
        for i, (a, b) in enumerate(zip(tokens_in, tokens_out)):
            total += self.block_ms(i, a) if a == b else 0.5 * (self.block_ms(i, a) + self.block_ms(i, b)) + self.overhead_ms
        return total

    def save(self, path) -> Path:
        return write_text(path, json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path) -> "LatencyTable":
        try:
            return cls(**json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as err:
            raise ScheduleError(f"{path} is not a graphprune latency table ({err}); delete it to profile again") from None


def device_name() -> str:
    """What the table was measured on: the CPU model, thread count and torch version."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu} · {torch.get_num_threads()} threads · torch {torch.__version__.split('+')[0]}"


def model_key(model: torch.nn.Module, example_inputs: tuple) -> str:
    """A fingerprint of the model's structure, weights' shapes and input shape (not of weight values)."""
    h = hashlib.sha1(type(model).__qualname__.encode())
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
    for t in example_inputs:
        if isinstance(t, torch.Tensor):
            h.update(f"{tuple(t.shape[1:])}:{t.dtype}".encode())
    return f"{type(model).__name__}-{h.hexdigest()[:12]}"


def default_cache_dir() -> Path:
    return Path(os.environ.get("GRAPHPRUNE_CACHE", Path.home() / ".cache" / "graphprune")) / "latency"


def _record_block_calls(model: torch.nn.Module, paths: list[str], inputs: tuple) -> tuple[torch.nn.Module, dict]:
    """A private copy of the model, and the (args, kwargs) each block receives on ``inputs``."""
    twin = copy.deepcopy(model).eval()
    calls, handles = {}, []
    for path in paths:
        def hook(module, args, kwargs, path=path):
            calls.setdefault(path, (args, kwargs))
        handles.append(twin.get_submodule(path).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.inference_mode():
            twin(*inputs)
    finally:
        for h in handles:
            h.remove()
    return twin, calls


def _at_tokens(value, full: int, n: int, hidden: bool = False):
    """``value`` with every token axis (size ``full``, after the batch axis) cut to ``n``."""
    if isinstance(value, torch.Tensor):
        axes = [1] if hidden else [d for d in range(1, value.dim()) if value.shape[d] == full]
        for d in axes:
            value = value.narrow(d, 0, n)
        return value.contiguous()
    if isinstance(value, (tuple, list)):
        return type(value)(_at_tokens(v, full, n) for v in value)
    if isinstance(value, dict):
        return {k: _at_tokens(v, full, n) for k, v in value.items()}
    return value


def default_counts(full: int, protected: int = 1, points: int = 8) -> list[int]:
    """``points`` token counts from about full/8 to ``full``, ascending."""
    low = max(protected + 2, full // 8)
    return sorted({round(low + (full - low) * k / (points - 1)) for k in range(points)})


def _min_times(fns: dict, rounds: int, progress=None, label: str = "profiling") -> dict:
    best = {k: float("inf") for k in fns}
    names = list(fns)
    task = progress.add_task(label, total=rounds + 1) if progress is not None else None
    with torch.inference_mode():
        for i in range(rounds + 1):  # round 0 warms up
            for k in names[i % len(names):] + names[: i % len(names)]:
                t0 = gb.clock()
                fns[k]()
                if i:
                    best[k] = min(best[k], gb.clock() - t0)
            if task is not None:
                progress.advance(task)
    return {k: v * 1e3 for k, v in best.items()}


STALE = 1.3  # a cached table is profiled again when the unmodified model now runs this many times faster or slower


@dataclass
class TableChoice:
    """The latency table :func:`choose_table` uses: where it lives, whether the cached one was reused, and the
    unmodified model's time measured now to check it (``checked_ms``; None when profiled afresh without a cache)."""

    table: LatencyTable
    path: Path
    reused: bool
    checked_ms: Optional[float] = None
    stale_ms: Optional[float] = None  # the cached table's baseline when it was found stale and profiled again

    def describe(self) -> str:
        if self.reused:
            return (f"latency table {self.path} (cached; the unmodified model {self.checked_ms:.2f} ms now, "
                    f"{self.table.full_ms:.2f} ms in the table)")
        if self.stale_ms is not None:
            return (f"latency table {self.path} profiled again: the cached one was stale (the unmodified model "
                    f"{self.checked_ms:.2f} ms now, {self.stale_ms:.2f} ms in it)")
        return f"latency table {self.path} (profiled now)"


def latency_table(model: torch.nn.Module, example_inputs, *, target: str = "eager", counts: Optional[Sequence[int]] = None,
                  rounds: int = 5, cache_dir=None, refresh: bool = False, progress=None) -> LatencyTable:
    """Profile every block of ``model`` at token ``counts`` on ``example_inputs`` (their batch is the table's).

    Cached in ``cache_dir`` (default ``~/.cache/graphprune/latency``, or ``$GRAPHPRUNE_CACHE``)
    per device, runtime, model and batch, and reused while the unmodified model's time measured now stays within
    :data:`STALE` × the table's (a table profiled on a busy machine is profiled again); ``refresh`` profiles again.
    """
    return choose_table(model, example_inputs, target=target, counts=counts, rounds=rounds, cache_dir=cache_dir,
                        refresh=refresh, progress=progress).table


def choose_table(model: torch.nn.Module, example_inputs, *, target: str = "eager", counts: Optional[Sequence[int]] = None,
                 rounds: int = 5, cache_dir=None, refresh: bool = False, progress=None) -> TableChoice:
    """:func:`latency_table`, saying which table it used and why."""
    if target not in TARGETS:
        raise GraphPruneError(f"unknown tuning target '{target}'; choose one of {', '.join(TARGETS)}")
    inputs = gb.as_args(example_inputs)
    batch = int(inputs[0].shape[0])
    key = f"{model_key(model, inputs)}-b{batch}-{target}-" + hashlib.sha1(device_name().encode()).hexdigest()[:8]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / f"{key}.json"
    checked = stale = None
    if path.is_file() and not refresh:
        table = LatencyTable.load(path)
        if counts is None or list(counts) == table.counts:
            checked = unmodified_ms(model, inputs, target)
            if 1 / STALE <= checked / table.full_ms <= STALE:
                return TableChoice(table, path, True, checked)
            stale = table.full_ms
    return TableChoice(_profile(model, inputs, target, counts, rounds, progress, key, path), path, False, checked, stale)


def unmodified_ms(model: torch.nn.Module, inputs: tuple, target: str, rounds: int = 5) -> float:
    """The unmodified model's time on ``target`` now, in ms (the fastest of ``rounds`` after a warm-up), as the
    latency table measures it (on ONNX Runtime: the model exported at zero reduction)."""
    with tempfile.TemporaryDirectory(prefix="graphprune-tune-") as tmp:
        if target == "onnx":
            run = optimize(model, "tome", target="onnx", output=Path(tmp) / "model.onnx", example_inputs=first_two(inputs),
                           r=0)
        else:
            run = model
        best = float("inf")
        with torch.inference_mode():
            for i in range(rounds + 1):
                t0 = gb.clock()
                run(*inputs)
                if i:
                    best = min(best, gb.clock() - t0)
    return best * 1e3


def _profile(model, inputs, target, counts, rounds, progress, key, path) -> LatencyTable:
    with torch.inference_mode():
        paths = find_block_paths(model, inputs)
    twin, calls = _record_block_calls(model, paths, inputs)
    args0, _ = calls[paths[0]]
    full = int(args0[0].shape[1])
    counts = sorted(set(int(c) for c in counts)) if counts is not None else default_counts(full)
    if counts[-1] != full:
        counts = sorted(set(c for c in counts if c < full) | {full})
    example, batch = first_two(inputs), int(inputs[0].shape[0])
    with tempfile.TemporaryDirectory(prefix="graphprune-tune-") as tmp:
        fns = {}
        for i, p in enumerate(paths):
            block = twin.get_submodule(p)
            args, kwargs = calls[p]
            for n in counts:
                a = (_at_tokens(args[0], full, n, hidden=True), *_at_tokens(tuple(args[1:]), full, n))
                kw = _at_tokens(kwargs, full, n)
                if target == "onnx":
                    fns[(i, n)] = _onnx_block(block, a, kw, Path(tmp) / f"block{i}_{n}.onnx")
                else:
                    fns[(i, n)] = (lambda block=block, a=a, kw=kw: block(*a, **kw))
        # the rewritten model runs as a captured graph: "the rest" is that graph at zero reduction minus its
        # blocks; on ONNX Runtime that graph exported is also the unmodified model on that runtime
        if target == "onnx":
            graph = optimize(model, "tome", target="onnx", output=Path(tmp) / "model.onnx", example_inputs=example, r=0)
            fns["model"] = fns["graph"] = lambda: graph(*inputs)
        else:
            graph = optimize(model, "tome", example_inputs=example, r=0)
            fns["model"] = lambda: twin(*inputs)  # the unmodified model (an eval-mode copy)
            fns["graph"] = lambda: graph(*inputs)
        ms = _min_times(fns, rounds, progress)
    blocks = [[ms[(i, n)] for n in counts] for i in range(len(paths))]
    rest = max(ms["graph"] - sum(b[-1] for b in blocks), 0.0)
    table = LatencyTable(counts=counts, blocks=blocks, rest_ms=rest, full_ms=ms["model"], batch=batch, target=target,
                         device=device_name(), model=key)
    try:
        table.save(path)
    except GraphPruneError:
        pass  # an unwritable cache only costs a new profile next time
    return table


class _Call(torch.nn.Module):
    """One block called with fixed keyword arguments, returning its hidden states (for export)."""

    def __init__(self, block, kwargs):
        super().__init__()
        self.block, self.kwargs = block, kwargs

    def forward(self, *args):
        out = self.block(*args, **self.kwargs)
        return out if isinstance(out, torch.Tensor) else next(t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


def _onnx_block(block, args: tuple, kwargs: dict, path: Path) -> Callable:
    """Block ``block`` at these inputs' shapes, exported to ONNX and run in ONNX Runtime."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(_Call(block, kwargs), args, dynamo=True, opset_version=OPSET, verbose=False)
        program.save(str(path))
    session = OnnxModel(path)
    tensors = tuple(a for a in args if isinstance(a, torch.Tensor))
    return lambda: session(*tensors)


# --------------------------------------------------------------------------------------------
# schedules of per-block counts, scaled to a latency budget
# --------------------------------------------------------------------------------------------


def tome_tokens(r: Sequence[int], tokens: int, protected: int) -> tuple[list[int], list[int]]:
    """Tokens entering and leaving each block under ToMe's per-block ``r`` (capped at half the mergeable tokens)."""
    tin, tout, n = [], [], tokens
    for ri in r:
        tin.append(n)
        n -= min(ri, (n - protected) // 2)
        tout.append(n)
    return tin, tout


def ramp(mean: float, slope: float, depth: int, start: int = 0) -> list[int]:
    """``depth`` per-block values, zero before ``start``, then a linear ramp of mean ``mean``: the first
    active block gets mean·(1 − slope), the last mean·(1 + slope) (slope in [-1, 1])."""
    active = depth - start
    out = [0] * start
    for k in range(active):
        t = k / max(active - 1, 1)
        out.append(max(int(round(mean * (1 - slope + 2 * slope * t))), 0))
    return out


def fit_to_budget(table: LatencyTable, make: Callable[[float], list[int]], budget_ms: float, tokens: int, protected: int,
                  hi: float = 512.0) -> Optional[list[int]]:
    """The gentlest schedule ``make(m)`` (bisection on m) whose predicted latency meets ``budget_ms``; None if none does."""
    def cost(m):
        return table.predict(*tome_tokens(make(m), tokens, protected))

    if cost(hi) > budget_ms:
        return None
    lo = 0.0
    if cost(lo) <= budget_ms:
        return make(lo)
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if cost(mid) <= budget_ms else (mid, hi)
    return make(hi)


def fit_ramp(table: LatencyTable, slope: float, start: int, budget_ms: float, tokens: int, protected: int) -> Optional["Candidate"]:
    """The ramp of ``slope`` from block ``start`` scaled to just meet ``budget_ms``; None if no ramp does."""
    depth = len(table.blocks)
    r = fit_to_budget(table, lambda m: ramp(m, slope, depth, start), budget_ms, tokens, protected)
    return None if r is None else Candidate(r, slope, start, table.predict(*tome_tokens(r, tokens, protected)))


@dataclass
class Candidate:
    r: list[int]
    slope: float
    start: int
    predicted_ms: float
    score: Optional[float] = None
    samples: Optional[torch.Tensor] = None  # the score per calibration sample (its mean is ``score``)

    @property
    def family(self) -> str:
        return f"ramp of slope {self.slope:+.2f} from block {self.start}"


def candidates(table: LatencyTable, budget_ms: float, tokens: int, protected: int,
               slopes: Sequence[float] = (-0.8, -0.4, 0.0, 0.4, 0.8), starts: Sequence[int] = (0, 1, 2)) -> list[Candidate]:
    """Ramps of several slopes and late starts, each scaled to just meet ``budget_ms`` by the table."""
    out, seen = [], set()
    for start in starts:
        if start >= len(table.blocks):
            continue
        for slope in slopes:
            c = fit_ramp(table, slope, start, budget_ms, tokens, protected)
            effect = None if c is None else tuple(tome_tokens(c.r, tokens, protected)[1])  # r beyond the cap changes nothing
            if c is None or effect in seen:
                continue
            seen.add(effect)
            out.append(c)
    return out


def search(table: LatencyTable, budget_ms: float, tokens: int, protected: int, score: Callable[[list[int]], object],
           refine: int = 3, progress=None, noise: float = 2.0) -> tuple[Candidate, list[Candidate]]:
    """The candidate with the best ``score`` (higher is better) among those predicted to meet ``budget_ms``.

    ``score(r)`` gives a number, or one number per calibration sample (their mean is the score).
    After the family sweep, ``refine`` more slopes are tried by halving the interval around
    the best slope (same start). With per-sample scores, the constant schedule stays the choice
    unless the best beats it by more than ``noise`` standard errors of the per-sample difference.
    Returns (best, every candidate scored).
    """
    pool = candidates(table, budget_ms, tokens, protected)
    if not pool:
        depth = len(table.blocks)
        fastest = table.predict(*tome_tokens([tokens] * depth, tokens, protected))
        unreduced = table.predict([tokens] * depth, [tokens] * depth)
        raise ScheduleError(f"no schedule reaches {budget_ms:.2f} ms: the model is predicted at {unreduced:.2f} ms unreduced and "
                            f"{fastest:.2f} ms merging all it can (the unmodified model: {table.full_ms:.2f} ms); "
                            "ask for a smaller speedup or a larger latency")
    task = progress.add_task("scoring schedules", total=len(pool) + refine) if progress is not None else None

    def evaluate(c: Candidate) -> Candidate:
        c.samples = torch.as_tensor(score(c.r), dtype=torch.float64).reshape(-1)
        c.score = float(c.samples.mean())
        if task is not None:
            progress.advance(task)
        return c

    scored = [evaluate(c) for c in pool]
    best = max(scored, key=lambda c: c.score)
    step = 0.2
    for _ in range(refine):
        trials = []
        for s in (best.slope - step, best.slope + step):
            if -1.0 <= s <= 1.0:
                c = fit_ramp(table, s, best.start, budget_ms, tokens, protected)
                if c is not None and all(o.r != c.r for o in scored):
                    trials.append(evaluate(c))
        scored += trials
        best = max([best, *trials], key=lambda c: c.score)
        step /= 2
    constant = next((c for c in scored if c.slope == 0.0 and c.start == 0), None)
    if constant is not None and best is not constant and len(best.samples) > 1:
        gain, stderr = paired_gain(best.samples, constant.samples)
        if gain <= noise * stderr:
            best = constant
    return best, scored


def paired_gain(samples: torch.Tensor, baseline: torch.Tensor) -> tuple[float, float]:
    """Mean per-sample gain of ``samples`` over ``baseline`` and its standard error."""
    d = samples - baseline
    return float(d.mean()), float(d.std() / len(d) ** 0.5) if len(d) > 1 else 0.0


# --------------------------------------------------------------------------------------------
# tune
# --------------------------------------------------------------------------------------------


def check_options(recipe: str, options: Optional[dict]) -> dict:
    """The recipe's fixed options for tuning, checked: the tuned count is not among them, the rest are valid."""
    options = dict(options or {})
    if TUNABLE[recipe] in options:
        raise ScheduleError(f"'{TUNABLE[recipe]}' is what tune chooses: give the recipe's other options only")
    get_recipe(recipe, **options)  # bad options: fail before profiling
    return options


def tune(model: torch.nn.Module, recipe: str = "tome", *, speedup: Optional[float] = None, latency_ms: Optional[float] = None,
         example_inputs=None, calibration=None, target: str = "eager", output_fn: Optional[Callable] = None,
         metric: str = "cosine", rounds: int = 5, cache_dir=None, refresh: bool = False, measure: bool = True,
         progress: bool = True, options: Optional[dict] = None) -> Schedule:
    """A per-block schedule for ``recipe`` that meets a speedup (or latency) on this device with the best fidelity.

    ``example_inputs``: a batch at the batch size to tune for (its batch is the table's).
    ``calibration``: batches (tuples of model inputs, or tensors) the fidelity is scored on;
    default: the example batch. Returns a :class:`~graphprune.schedule.files.Schedule` (save it
    with ``.save(path)``; apply it with ``optimize(model, schedule=...)``) whose ``info`` holds
    the predicted and measured latency and the fidelity. ``options``: the recipe's other options,
    fixed while the per-block count is tuned (``{"metric": "tokens"}``), saved with the schedule.
    """
    if recipe not in TUNABLE:
        get_recipe(recipe)  # an unknown recipe: that error, with its suggestion
        raise RecipeError(f"tune chooses per-block schedules for {', '.join(TUNABLE)}; '{recipe}' has no per-block count to tune")
    options = check_options(recipe, options)
    if metric not in gb.PER_SAMPLE:
        raise ScheduleError(f"tune scores schedules by {' or '.join(gb.PER_SAMPLE)}, got metric={metric!r}")
    if (speedup is None) == (latency_ms is None):
        raise ScheduleError("give exactly one goal: speedup=1.8 or latency_ms=12")
    if speedup is not None and not speedup > 1.0:
        raise ScheduleError(f"speedup must be above 1.0, got {speedup}")
    if latency_ms is not None and not latency_ms > 0:
        raise ScheduleError(f"latency_ms must be positive, got {latency_ms}")
    inputs = gb.as_args(example_inputs if example_inputs is not None else default_example_inputs(model))
    data = [inputs] if calibration is None else [gb.as_args(d) for d in calibration]
    output_fn = output_fn or gb.primary_output
    example = first_two(inputs)

    with eval_mode(model), gb._progress(progress) as bar:  # flags restored after
        chosen = choose_table(model, inputs, target=target, rounds=rounds, cache_dir=cache_dir, refresh=refresh, progress=bar)
        table = chosen.table
        budget = latency_ms if latency_ms is not None else table.full_ms / speedup
        probe = optimize(model, recipe, example_inputs=example, **{**options, TUNABLE[recipe]: 0})
        tokens, protected = probe.report.tokens_per_block[0], probe.report.layout["prefix_tokens"]
        reference = gb.outputs(model, data, output_fn)

        def build(r):
            return optimize(model, recipe, example_inputs=example, **options, **{TUNABLE[recipe]: list(r)})

        def score(r):
            return gb.per_sample(reference, gb.outputs(build(r), data, output_fn), metric)

        def measure_ms(r) -> tuple[float, float]:
            """(unmodified, with schedule r) in ms on the target, interleaved, min of the rounds."""
            with tempfile.TemporaryDirectory(prefix="graphprune-tune-") as tmp:
                if target == "onnx":
                    fns = {name: optimize(model, recipe, target="onnx", output=Path(tmp) / f"{name}.onnx",
                                                     example_inputs=example, **options, **{TUNABLE[recipe]: list(rr)})
                           for name, rr in (("baseline", [0] * len(r)), ("tuned", r))}
                else:
                    fns = {"baseline": model, "tuned": build(r)}
                times = gb.interleaved(fns, inputs, rounds=max(rounds, 3), warmup=1)
            return min(times["baseline"]) * 1e3, min(times["tuned"]) * 1e3

        if measure:  # calibration: the reduction op's cost and the table's bias, from the constant schedule at the budget
            c = fit_ramp(table, 0.0, 0, budget, tokens, protected)
            constant = None if c is None else c.r
            if constant is not None and any(constant):
                base_ms, got_ms = measure_ms(constant)
                reducing = sum(1 for a, b in zip(*tome_tokens(constant, tokens, protected)) if a != b)
                raw = table.predict(*tome_tokens(constant, tokens, protected))  # in the table's time, like got_ms rescaled
                table.overhead_ms = (got_ms * table.full_ms / base_ms - raw) / max(reducing, 1)
        best, scored = search(table, budget, tokens, protected, score, progress=bar)
        info = {"model": table.model, "target": target, "batch": table.batch, "device": table.device,
                "latency_table": chosen.describe(),
                "goal": {"speedup": speedup} if speedup is not None else {"latency_ms": latency_ms},
                "baseline_ms": table.full_ms, "predicted_ms": best.predicted_ms, "fidelity": {metric: best.score},
                "family": best.family, "overhead_ms": table.overhead_ms,
                "candidates": [{"r": c.r, "family": c.family, "predicted_ms": c.predicted_ms, metric: c.score} for c in scored]}
        top = max(scored, key=lambda c: c.score)
        if top is not best:  # the constant schedule kept: the best score was within calibration noise of it
            gain, stderr = paired_gain(top.samples, best.samples)
            info["within_noise"] = {"r": top.r, "family": top.family, "gain": gain, "stderr": stderr}
        if measure:
            base_ms, got_ms = measure_ms(best.r)
            # the measured run's baseline may drift from the table's: compare as speedups
            info.update(measured_ms=got_ms, measured_baseline_ms=base_ms, measured_speedup=base_ms / got_ms,
                        predicted_speedup=table.full_ms / best.predicted_ms,
                        prediction_error=(table.full_ms / best.predicted_ms) / (base_ms / got_ms) - 1.0)
    return Schedule(recipe, {**options, TUNABLE[recipe]: best.r}, info)
