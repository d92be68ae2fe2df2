"""Architecture coverage of graphprune: which models it captures, reduces and exports.

    python benchmarks/coverage.py                     # full sweep → docs/coverage.md + docs/coverage.json
    python benchmarks/coverage.py --no-onnx           # skip the ONNX export checks (much faster)
    python benchmarks/coverage.py --only deit --limit 5

Every model is built tiny with random weights (nothing is downloaded): timm Vision
Transformer-like architectures (one name per architecture, found with ``timm.list_models``)
and a few Hugging Face architectures from tiny configs. For each model and each recipe in
``graphprune.list_recipes()`` the sweep checks:

1. capture: ``optimize(model, "tome", r=0)`` succeeds (a refusal records its reason);
2. zero reduction: the recipe at its no-op setting (``Recipe.zero``: tome r=0, evit keep=1.0, ...)
   reproduces the original output, max |Δ| ≤ 1e-5;
3. reduction: the recipe at a small reduction runs and the last block sees fewer tokens
   than the first (or, for a reduction inside the last block, the FLOPs drop);
4. ONNX: the same reduction exported with ``target="onnx"`` matches the eager graph in ONNX
   Runtime, max |Δ| ≤ 1e-4.

Each check runs in its own cell: an exception is recorded and the sweep goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fnmatch
import io
import json
import logging
import multiprocessing as mp
import os
import queue
import re
import shlex
import signal
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import timm
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import graphprune
from graphprune.api import default_example_inputs
from graphprune import errors
from graphprune.errors import GraphPruneError
from graphprune.recipes import RECIPES
from graphprune.report import max_abs_diff

def _source_hash() -> str:
    """Fingerprint of the graphprune sources this process imported (rows from other states are not reused)."""
    import hashlib

    h = hashlib.sha1()
    root = Path(graphprune.__file__).parent
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def _git_state() -> str:
    import subprocess

    root = Path(graphprune.__file__).parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "graphprune"], cwd=root, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"
    return (head or "unknown") + ("+local changes" if dirty else "")


GRAPHPRUNE_SRC = _source_hash()

ZERO_TOL = 1e-5
ONNX_TOL = 1e-4
CELL_TIMEOUT_S = 240
MAX_DEFAULT_PARAMS = 40e6  # a model that cannot be shrunk is built at its own size only below this

# --------------------------------------------------------------------------------------------
# recipes: the no-op and the small-reduction setting of each
# --------------------------------------------------------------------------------------------

KNOWN_REDUCE = {"tome": {"r": 4}, "evit": {"keep": 0.7}}  # the others reduce at their defaults


def recipe_settings() -> dict:
    """recipe -> {"zero": its no-op options (``Recipe.zero``), "reduce": options}."""
    return {name: {"zero": dict(RECIPES[name].zero), "reduce": KNOWN_REDUCE.get(name, {})}
            for name in graphprune.list_recipes("tokens")}


# --------------------------------------------------------------------------------------------
# timm models: one name per architecture, built tiny
# --------------------------------------------------------------------------------------------

TIMM_PATTERNS = [
    "vit_*", "deit*", "eva*", "beit*", "flexivit*", "samvit*", "naflexvit*",  # plain-token ViTs (and a few refusals)
    "swin*", "pit_*", "cait*", "xcit*", "levit*", "crossvit*", "twins*", "mvitv2*", "volo*", "tnt*",
    "convit*", "hiera*", "tiny_vit*", "gcvit*", "davit*", "vitamin*",
]
# size words: dropped when grouping names by architecture; the smallest name of a group is kept
SIZE_RANK = [
    "tiny", "ti", "xxtiny", "xtiny", "nano", "mini", "micro", "xxs", "xs", "wee", "pwee", "dwee", "little",
    "dlittle", "xsmall", "s", "small", "betwixt", "medium", "mediumd", "m", "base", "b", "large", "l", "large2",
    "xlarge", "huge", "so150m", "so150m2", "so400m", "intern300m", "giant", "giantopt", "gigantic", "enormous",
    "5b", "7b",
]
_SIZE_WORDS = set(SIZE_RANK)
# variants with the same blocks as their base name (activation, bias, pretraining config, ...)
# (position-embedding flavour, pretraining config, release version): the blocks and token layout are the same
_VARIANT_WORDS = {
    "plus", "quickgelu", "qkvb", "core", "lang", "spatial", "fl", "legacy", "ns", "miil", "v3", "v4", "par",
    "parfac", "ape", "mixed",
}
_SHAPE_WORD = re.compile(r"patch\d+|p\d+|\d+|\d+to\d+|window\d+(to\d+)?|x*s\d\d+|m\d+|d\d|\d+[msd]|\d+x\d+")


def arch_key(name: str) -> str:
    """The architecture a timm name stands for: the name without size, patch and resolution words."""
    parts = [re.sub(r"^(r|resnet)\d+d?$", r"\1", p) for p in name.split("_")]  # hybrids: one per stem kind
    kept = [parts[0]] + [p for p in parts[1:]
                         if p not in _SIZE_WORDS and p not in _VARIANT_WORDS and not _SHAPE_WORD.fullmatch(p)]
    return "_".join(kept)


def _size_rank(name: str) -> tuple:
    ranks = [SIZE_RANK.index(p) for p in name.split("_")[1:] if p in _SIZE_WORDS]
    numbers = [int(n) for n in re.findall(r"\d+", name)]
    return (min(ranks) if ranks else len(SIZE_RANK) // 2, max(numbers) if numbers else 0, len(name), name)


def timm_names(per_arch: int = 1) -> list[str]:
    """One name per architecture (the smallest), or the ``per_arch`` smallest names of each."""
    groups: dict[str, list[str]] = {}
    for pattern in TIMM_PATTERNS:
        for name in timm.list_models(pattern):
            groups.setdefault(arch_key(name), []).append(name)
    return [n for names in groups.values() for n in sorted(set(names), key=_size_rank)[:per_arch]]


TINY = dict(embed_dim=48, depth=4, num_heads=3)
# families whose constructors take other arguments (stage lists, per-block settings): settings
# that keep them tiny, tried first (fnmatch patterns on the timm name)
FAMILY_TINY = {
    "swin_*": dict(img_size=64, window_size=4, embed_dim=24, depths=(2, 2), num_heads=(3, 3)),
    "swinv2_*": dict(img_size=64, window_size=4, embed_dim=24, depths=(2, 2), num_heads=(3, 3)),
    "swinv2_cr_*": dict(img_size=(64, 64), window_size=4, embed_dim=24, depths=(2, 2), num_heads=(3, 3)),
    "vit_*resnet*": dict(img_size=128, **TINY),  # hybrids: a CNN stem (stride 16-32) before the blocks
    "vit_*_r*_s*": dict(img_size=128, **TINY),
    "*sapiens2*": dict(img_size=32, patch_size=4, num_kv_heads=(3, 3, 3, 3), **TINY),
    "pit_*": dict(img_size=64, depth=(1, 1, 1)),
    "cait*": dict(img_size=32, patch_size=4, depth_token_only=1, **TINY),
    "xcit*": dict(img_size=64, **TINY),
    "levit*": dict(img_size=64, depth=(1, 1, 1)),
    "crossvit*": dict(img_size=(64, 96), depth=((1, 1, 0),)),
    "twins*": dict(img_size=64, depths=(1, 1, 1, 1)),
    "mvitv2*": dict(img_size=64, depths=(1, 1, 1, 1)),
    "volo*": dict(img_size=64, layers=(1, 1, 1, 1)),
    "tnt*": dict(img_size=64, depth=2),
    "convit*": dict(img_size=32, patch_size=4, local_up_to_layer=2, **TINY),
    "hiera*": dict(img_size=64, stages=(1, 1, 1, 1)),
    "tiny_vit*": dict(img_size=64, depths=(1, 1, 1, 1)),
    "gcvit*": dict(img_size=64, depths=(1, 1, 1, 1)),
    "davit*": dict(depths=(1, 1, 1, 1)),
    "vitamin*": dict(img_size=128, depth=2),
}


def _patch(name: str) -> int:
    m = re.search(r"patch(\d+)", name)
    return int(m.group(1)) if m else 16


def override_ladder(name: str) -> list[dict]:
    """Overrides to try, smallest model first; the last step is the model's own size."""
    patch = _patch(name)
    steps = [v for k, v in FAMILY_TINY.items() if fnmatch.fnmatchcase(name, k)]
    steps += [
        dict(img_size=32, patch_size=4, **TINY),  # 64 patches, like the test suite
        dict(img_size=4 * patch, **TINY),  # 16 patches at the model's own patch size
        dict(TINY),
        dict(depth=4),
        {},
    ]
    return steps


def _param_count(name: str, kw: dict) -> int:
    with torch.device("meta"):
        m = timm.create_model(name, pretrained=False, num_classes=10, **kw)
    return sum(p.numel() for p in m.parameters())


def _hw(size) -> tuple:
    return (size, size) if isinstance(size, int) else tuple(size)


def example_inputs(model, kw: dict, seed: int) -> tuple[tuple, str | None]:
    """Batch-2 images of the size the model expects: ``default_example_inputs``, unless it
    disagrees with the ``img_size`` the model was built with or the model rejects its shape
    (then the built size with 3 channels; the note says why)."""
    try:
        default = tuple(default_example_inputs(model)[0].shape)
    except Exception as e:
        default, err = None, first_line(e)
    shapes = []
    if default is not None:
        if "img_size" in kw and default[2:] != _hw(kw["img_size"]):
            shapes.append(((default[0], default[1], *_hw(kw["img_size"])),
                           f"default_example_inputs gave {list(default)}; the model was built for img_size={kw['img_size']}"))
        shapes.append((default, None))
    hw = _hw(kw["img_size"]) if "img_size" in kw else (default[2:] if default else None)
    if hw is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        hw = tuple(cfg.get("input_size", (3, 224, 224))[1:])
    shapes.append(((2, 3, *hw), f"default_example_inputs gave {list(default) if default else err}; "
                                "the model rejects it, used 3-channel images"))
    last = None
    for shape, note in shapes:
        torch.manual_seed(seed)
        x = (torch.randn(*shape),)
        try:
            with torch.no_grad():
                model(*x)
            return x, note
        except Exception as e:
            last = e
    raise last


def build_timm(name: str, seed: int = 0):
    """(model, inputs, overrides, note) for the first override set that builds and runs a forward pass."""
    errors = []
    for kw in override_ladder(name):
        try:
            with quiet():
                try:
                    params = _param_count(name, kw)
                except Exception:  # models that cannot be built on the meta device
                    params = None
                if params is not None and params > MAX_DEFAULT_PARAMS:
                    raise ValueError(f"{params / 1e6:.0f}M parameters at this size; too large for the sweep")
                torch.manual_seed(seed)
                model = timm.create_model(name, pretrained=False, num_classes=10, **kw).eval()
                x, note = example_inputs(model, kw, seed + 1)
            return model, x, kw, note
        except Exception as e:  # unsupported kwargs (TypeError), incompatible sizes, ...
            errors.append((kw, first_line(e)))
    (kw0, e0), (kw1, e1) = errors[0], errors[-1]
    raise BuildError(f"cannot build tiny ({e0})" + (f"; at its own size: {e1}" if kw1 != kw0 else ""))


# --------------------------------------------------------------------------------------------
# Hugging Face models: tiny random configs
# --------------------------------------------------------------------------------------------

HF_BASE = dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=3, intermediate_size=96)
HF_VISION = dict(image_size=32, patch_size=4)
HF_TEXT = dict(vocab_size=100, max_position_embeddings=64)
HF = {  # name -> (model class, config class, config overrides)
    "ViTModel": ("ViTModel", "ViTConfig", HF_VISION),
    "ViTForImageClassification": ("ViTForImageClassification", "ViTConfig", dict(num_labels=5, **HF_VISION)),
    "DeiTForImageClassificationWithTeacher": (
        "DeiTForImageClassificationWithTeacher", "DeiTConfig", dict(num_labels=5, **HF_VISION)),
    "Dinov2Model": ("Dinov2Model", "Dinov2Config", HF_VISION),
    "CLIPVisionModel": ("CLIPVisionModel", "CLIPVisionConfig", HF_VISION),
    "SiglipVisionModel": ("SiglipVisionModel", "SiglipVisionConfig", HF_VISION),
    "BertModel": ("BertModel", "BertConfig", HF_TEXT),
    "RobertaModel": ("RobertaModel", "RobertaConfig", HF_TEXT),
}
HF_TEXT_MODELS = {"BertModel", "RobertaModel"}


def hf_inputs(name: str, batch: int, seed: int = 1) -> tuple:
    """Images, or token ids with an attention mask padding two samples on the right."""
    g = torch.Generator().manual_seed(seed)
    if name not in HF_TEXT_MODELS:
        return (torch.randn(batch, 3, 32, 32, generator=g),)
    ids = torch.randint(3, 100, (batch, 20), generator=g)
    mask = torch.ones(batch, 20, dtype=torch.long)
    for b, length in zip(range(1, batch), (14, 9, 17)):
        mask[b, length:] = 0
        ids[b, length:] = 1  # the pad id
    return ids, mask


def build_hf(name: str, seed: int = 0):
    import transformers

    cls_name, cfg_name, kw = HF[name]
    with quiet():
        cfg = getattr(transformers, cfg_name)(**{**HF_BASE, **kw})
        torch.manual_seed(seed)
        model = getattr(transformers, cls_name)(cfg).eval()
    batch = 3 if name in HF_TEXT_MODELS else 2
    return model, hf_inputs(name, batch), {**HF_BASE, **kw}, None


# --------------------------------------------------------------------------------------------
# cells: one check each, quiet, time-limited, never raising
# --------------------------------------------------------------------------------------------


class BuildError(Exception):
    pass


class CellTimeout(Exception):
    pass


def first_line(e: BaseException) -> str:
    """errors.first_line, prefixed with the type name for errors that are not our own."""
    line = errors.first_line(e)
    if isinstance(e, (GraphPruneError, BuildError)) or not str(e).strip():
        return line
    return f"{type(e).__name__}: {line}"


def _where(e: BaseException) -> str | None:
    """The innermost traceback frame inside graphprune, to point at the code that failed."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "/graphprune/" in f.filename.replace("\\", "/")]
    if not frames:
        return None
    f = frames[-1]
    return f"{Path(f.filename).name}:{f.lineno} ({f.name})"


@contextlib.contextmanager
def quiet():
    """Silence Python and C-level stdout/stderr, warnings and logging for the duration."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    sink = tempfile.TemporaryFile()
    prev_disable = logging.root.manager.disable
    try:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        logging.disable(logging.CRITICAL)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(prev_disable)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        sink.close()


def _alarm(signum, frame):
    raise CellTimeout(f"timed out after {CELL_TIMEOUT_S} s")


def cell(fn):
    """Run ``fn()`` quietly under a time limit: {"ok": True, **result} or {"ok": False, "reason": ...}."""
    t0 = time.perf_counter()
    use_alarm = hasattr(signal, "SIGALRM")
    if use_alarm:
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(CELL_TIMEOUT_S)
    try:
        with quiet():
            result = fn()
        out = {"ok": True, **result}
    except Exception as e:
        out = {"ok": False, "reason": first_line(e), "error": type(e).__name__,
               "refused": isinstance(e, GraphPruneError)}
        where = _where(e)
        if where and not isinstance(e, GraphPruneError):
            out["where"] = where
    finally:
        if use_alarm:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


# --------------------------------------------------------------------------------------------
# one model
# --------------------------------------------------------------------------------------------


def check_model(model, x, settings: dict, onnx: bool, tmp: Path) -> dict:
    row: dict = {}
    with torch.no_grad(), quiet():
        expected = model(*x)

    def zero(recipe, opts, optimized=None):
        def run():
            fast = optimized if optimized is not None else graphprune.optimize(model, recipe, example_inputs=x, **opts)
            with torch.no_grad():
                diff = max_abs_diff(fast(*x), expected)
            if not diff <= ZERO_TOL:
                raise AssertionError(f"max |Δ| = {diff:.2e} > {ZERO_TOL:g}")
            return {"diff": diff, "tokens": fast.report.tokens_per_block, "options": opts}
        return run

    # (1) capture: tome at r=0 is optimized without error; its output is checked in (2)
    captured = {}

    def capture():
        captured["model"] = graphprune.optimize(model, "tome", example_inputs=x, r=0)
        return {"tokens": captured["model"].report.tokens_per_block}

    row["capture"] = cell(capture)
    row["zero"] = {}
    if not row["capture"]["ok"]:
        return row
    # (2) zero reduction: every recipe at its no-op setting reproduces the original output
    for recipe, s in settings.items():
        if recipe == "tome" and s["zero"] == {"r": 0}:
            row["zero"][recipe] = cell(zero(recipe, s["zero"], captured["model"]))
        else:
            row["zero"][recipe] = cell(zero(recipe, s["zero"]))

    # (3) each recipe reduces tokens, and (4) its ONNX export matches. optimize() runs the rewritten
    # eager graph before exporting, so with ONNX on, a successful ONNX run also answers (3); the
    # eager-only run is made when ONNX is off or its export failed.
    row["reduce"], row["onnx"] = {}, {}
    for recipe, s in settings.items():
        opts = s["reduce"]

        def run_onnx(recipe=recipe, opts=opts):
            runner = graphprune.optimize(model, recipe, target="onnx", output=tmp / recipe / "model.onnx",
                                         example_inputs=x, **opts)
            rep = runner.report
            diff = rep.parity["onnx"]
            if not diff <= ONNX_TOL:
                raise AssertionError(f"ONNX max |Δ| = {diff:.2e} > {ONNX_TOL:g}")
            return {"diff": diff, "tokens": rep.tokens_per_block, "flop_ratio": rep.flop_ratio}

        def run_eager(recipe=recipe, opts=opts):
            fast = graphprune.optimize(model, recipe, example_inputs=x, **opts)
            with torch.no_grad():
                fast(*x)
            rep = fast.report
            return {"tokens": rep.tokens_per_block, "flop_ratio": rep.flop_ratio}

        row["onnx"][recipe] = cell(run_onnx) if onnx and s.get("onnx", True) else None
        if row["onnx"][recipe] and row["onnx"][recipe]["ok"]:
            o = row["onnx"][recipe]
            red = {"ok": True, "tokens": o["tokens"], "flop_ratio": o["flop_ratio"], "seconds": 0.0, "from": "onnx run"}
        else:
            red = cell(run_eager)
        red["options"] = opts
        # reduced: a later block sees fewer tokens, or (a reduction inside the last block) fewer FLOPs
        if red["ok"] and not (red["tokens"][-1] < red["tokens"][0] or red["flop_ratio"] < 1.0):
            red.update(ok=False, reason=f"no reduction: tokens {red['tokens'][0]}→{red['tokens'][-1]}, FLOPs ×{red['flop_ratio']:.2f}")
        row["reduce"][recipe] = red
    return row


def passes_all(row: dict) -> bool:
    if row.get("status") != "ok":
        return False
    checks = [row["capture"]] + [c for c in row["zero"].values() if c is not None]
    checks += list(row["reduce"].values()) + [c for c in row["onnx"].values() if c is not None]
    return all(c["ok"] for c in checks)


def status_of(row: dict) -> str:
    if row.get("status") == "unbuildable":
        return "unbuildable"
    if not row["capture"]["ok"]:
        return "refused" if row["capture"].get("refused") else "error"
    if passes_all(row):
        return "pass"
    # refused after capture (e.g. blocks that only run at the full token count): every failed check is a refusal
    checks = [c for group in ("zero", "reduce", "onnx") for c in row[group].values() if c is not None]
    failed = [c for c in checks if not c["ok"]]
    return "refused" if all(c.get("error") == "UnsupportedArchitectureError" for c in failed) else "fail"


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def _md(text: str, limit: int = 90) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _fmt_zero(row: dict) -> str:
    zero = row.get("zero") or {}
    known = {k: v for k, v in zero.items() if v is not None}
    if not row.get("capture", {}).get("ok"):
        return "—"
    bad = {k: v for k, v in known.items() if not v["ok"]}
    if bad:
        return "✗ " + "; ".join(f"{k}: {_md(v['reason'], 40)}" for k, v in bad.items())
    if not known:
        return "n/a"
    worst = max(v["diff"] for v in known.values())
    na = [k for k, v in zero.items() if v is None]
    return f"✓ {worst:.1e}" + (f" ({', '.join(na)}: n/a)" if na else "")


def _fmt_reduce(c) -> str:
    if c is None:
        return "—"
    if c["ok"]:
        return f"✓ {c['tokens'][0]}→{c['tokens'][-1]}"
    return "✗ " + _md(c["reason"], 50)


def _fmt_onnx(c) -> str:
    if c is None:
        return "—"
    if c["ok"]:
        return f"✓ {c['diff']:.1e}"
    return "✗ " + _md(c["reason"], 50)


def _reason(row: dict) -> str:
    st = row["status"]
    if st in ("refused", "error", "unbuildable"):
        return _md(row.get("reason", ""), 110)
    if st == "fail":
        cells = [("capture", row["capture"])] + [(f"zero {k}", v) for k, v in row["zero"].items() if v]
        cells += [(k, v) for k, v in row["reduce"].items()] + [(f"onnx {k}", v) for k, v in row["onnx"].items() if v]
        bad = [f"{k}: {v['reason']}" for k, v in cells if not v["ok"]]
        return _md(bad[0], 110) if bad else ""
    return ""


def _timm_unit(data: dict) -> str:
    """What the timm rows are: one model per architecture, or several names of each."""
    rows = [r for r in data["rows"] if r["source"] == "timm"]
    archs = {arch_key(r["model"]) for r in rows}
    if len(archs) == len(rows):
        return "architectures"
    passing = {arch_key(r["model"]) for r in rows if r["status"] == "pass"}
    return f"model names (of {len(archs)} architectures; {len(passing)} architectures pass)"


def write_markdown(path: Path, data: dict) -> None:
    recipes = data["recipes"]
    t = data["totals"]
    lines = [
        "# Architecture coverage",
        "",
        f"Generated by `{data['command']}` on {data['date']} ({data['runtime_s'] / 60:.1f} min with "
        f"{data['jobs']} worker process{'es' if data['jobs'] != 1 else ''} on {data['threads']} threads"
        + (f", {data['reused_from_checkpoint']} models from an earlier interrupted run" if data["reused_from_checkpoint"] else "")
        + "; "
        f"graphprune {data['graphprune']['git']}, torch {data['versions']['torch']}, timm {data['versions']['timm']}, "
        f"transformers {data['versions']['transformers']}). Reproduce with `python benchmarks/coverage.py`.",
        "",
        f"**Totals:** {t['timm_pass']} of {t['timm']} timm {_timm_unit(data)} and {t['hf_pass']} of {t['hf']} Hugging Face "
        f"architectures pass every check; {t['refused']} refused with a reason, {t['fail']} failed a check after "
        f"capture, {t['error']} crashed in capture, {t['unbuildable']} could not be built tiny.",
        "",
        "Every model is built tiny with random weights (timm: depth 4, width 48, 3 heads, 32×32 images in 4×4 "
        "patches where the architecture accepts these overrides; Hugging Face: 4 layers, hidden 48, 3 heads, "
        "32×32 images in 4×4 patches, or 20 token ids with right padding on two samples). Checks: "
        "**capture**: `optimize(model, \"tome\", r=0)` succeeds; "
        f"**zero**: the no-op setting of every recipe ({', '.join(f'{k} {v}' for k, v in data['zero_settings'].items())}) "
        f"reproduces the original output, max |Δ| ≤ {ZERO_TOL:g} (worst recipe shown); "
        f"**recipe columns**: the recipe with {', '.join(f'{k} {v}' for k, v in data['reduce_settings'].items())} "
        "runs and the last block sees fewer tokens than the first, or the FLOPs drop (tokens first→last); "
        f"**onnx**: the same reduction exported with `target=\"onnx\"` matches eager in ONNX Runtime, max |Δ| ≤ {ONNX_TOL:g}."
        + (" ONNX was skipped in this run (`--no-onnx`)." if not data["onnx"] else "")
        + (f" ONNX was checked for {', '.join(data['onnx_recipes'])} in this run (`--onnx-recipes`); every recipe's "
           "export is checked on the test suite's timm and Hugging Face families." if data.get("onnx_recipes") else ""),
        "",
    ]
    onnx_cols = data.get("onnx_recipes") or recipes
    head = ["model", "source", "capture", "zero-reduction"] + recipes + [f"onnx {r}" for r in onnx_cols] + ["reason"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for row in data["rows"]:
        st = row["status"]
        if st == "unbuildable":
            capture = "✗ build"
        elif "capture" not in row:
            capture = "✗ error"
        elif row["capture"]["ok"]:
            capture = "✓"
        else:
            capture = "✗ refused" if st == "refused" else "✗ error"
        cols = [f"`{row['model']}`", row["source"], capture, _fmt_zero(row)]
        cols += [_fmt_reduce((row.get("reduce") or {}).get(r)) for r in recipes]
        cols += [_fmt_onnx((row.get("onnx") or {}).get(r)) for r in onnx_cols]
        cols.append(_reason(row))
        lines.append("| " + " | ".join(cols) + " |")
    notes = [r for r in data["rows"] if r.get("input_note")]
    if notes:
        lines += ["", "Inputs not taken from `graphprune.api.default_example_inputs` as it stands:", ""]
        lines += [f"- `{r['model']}`: {r['input_note']}" for r in notes]
    lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def check_one(source: str, name: str, settings: dict, onnx: bool) -> dict:
    """Build one model and run every check on it; never raises."""
    t0 = time.perf_counter()
    row = {"model": name, "source": source, "graphprune_src": GRAPHPRUNE_SRC}
    try:
        model, x, overrides, note = (build_timm if source == "timm" else build_hf)(name)
        if note:
            row["input_note"] = note
        row["overrides"] = {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}
        row["input_shapes"] = [list(t.shape) for t in x]
        with tempfile.TemporaryDirectory(prefix="gp_coverage_") as tmp:
            row.update(check_model(model, x, settings, onnx, Path(tmp)))
        row["status"] = "ok"
        row["status"] = status_of(row)
        if row["status"] in ("refused", "error"):
            cells = [row["capture"]] + [c for g in ("zero", "reduce", "onnx") for c in row.get(g, {}).values()]
            failed = [c for c in cells if c is not None and not c["ok"]]
            row["reason"] = failed[0]["reason"]
    except Exception as e:  # a build failure, or a bug in this script: record it and go on
        row["status"] = "unbuildable" if isinstance(e, BuildError) else "error"
        row["reason"] = first_line(e)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _worker(wid: int, threads: int, onnx: bool, tasks, results) -> None:
    """A worker process: checks the models it is sent until it is sent None."""
    torch.set_num_threads(threads)
    settings = recipe_settings()
    if isinstance(onnx, (set, frozenset)):  # --onnx-recipes
        for name in settings:
            settings[name]["onnx"] = name in onnx
    while True:
        item = tasks.get()
        if item is None:
            return
        index, source, name = item
        results.put(("start", wid, index, None))
        results.put(("done", wid, index, check_one(source, name, settings, onnx)))


def run_models(models: list, todo: list, jobs: int, threads: int, onnx: bool, on_start, on_done) -> None:
    """Check ``models[i]`` for i in ``todo`` in ``jobs`` worker processes (in this process when jobs == 1).

    A worker that dies (a crash in native code) records its model as crashed and is replaced."""
    if not todo:
        return
    if jobs <= 1:
        torch.set_num_threads(threads)
        settings = recipe_settings()
        for index in todo:
            source, name = models[index]
            on_start(index)
            on_done(index, check_one(source, name, settings, onnx))
        return
    ctx = mp.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    for index in todo:
        tasks.put((index, *models[index]))
    per_worker = max(1, threads // jobs)
    workers, current = {}, {}

    def start(wid):
        proc = ctx.Process(target=_worker, args=(wid, per_worker, onnx, tasks, results), daemon=True)
        proc.start()
        workers[wid], current[wid] = proc, None

    jobs = min(jobs, len(todo))
    for wid in range(jobs):
        tasks.put(None)
        start(wid)
    remaining = len(todo)
    next_wid = jobs
    while remaining:
        try:
            kind, wid, index, row = results.get(timeout=2)
        except queue.Empty:
            for wid, proc in list(workers.items()):
                if proc.is_alive() or current[wid] is None:
                    continue
                index = current.pop(wid)
                del workers[wid]
                source, name = models[index]
                on_done(index, {"model": name, "source": source, "status": "error",
                                "reason": f"the worker process died (exit code {proc.exitcode})"})
                remaining -= 1
                tasks.put(None)  # the replacement needs its own stop marker
                start(next_wid)
                next_wid += 1
            continue
        if kind == "start":
            current[wid] = index
            on_start(index)
        else:
            current[wid] = None
            on_done(index, row)
            remaining -= 1
    for proc in workers.values():
        proc.join(timeout=10)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=None, help="check at most N models")
    ap.add_argument("--only", default=None, help="only models whose name contains SUBSTRING (case-insensitive)")
    ap.add_argument("--no-onnx", action="store_true", help="skip the ONNX export checks")
    ap.add_argument("--per-arch", type=int, default=1, help="timm names checked per architecture (default 1)")
    ap.add_argument("--onnx-recipes", default=None,
                    help="comma-separated recipes whose ONNX export is checked (default: all; each export takes seconds)")
    ap.add_argument("--out", type=Path, default=Path("docs/coverage.md"), help="markdown table (JSON written next to it)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in all (shared by the workers)")
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="JSON-lines file: each finished model is appended; models already in it are not run again")
    ap.add_argument("--jobs", type=int, default=2,
                    help="worker processes (default 2: exports are single-threaded Python, so two overlap well)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    # the console writes to a copy of the terminal, untouched when cells silence fds 1 and 2
    console = Console(file=os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1))
    settings = recipe_settings()
    recipes = list(settings)
    if args.onnx_recipes:
        chosen = set(args.onnx_recipes.split(","))
        unknown = chosen - set(recipes)
        if unknown:
            ap.error(f"--onnx-recipes: unknown recipe(s) {', '.join(sorted(unknown))}")
        for name in recipes:
            settings[name]["onnx"] = name in chosen

    models = [("timm", n) for n in timm_names(args.per_arch)] + [("hf", n) for n in HF]
    if args.only:
        models = [(s, n) for s, n in models if args.only.lower() in n.lower()]
    if args.limit is not None:
        models = models[: args.limit]

    console.print(f"[bold]graphprune coverage[/]: {len(models)} models, recipes {', '.join(recipes)}, "
                  f"onnx {'off' if args.no_onnx else 'on'}, {args.jobs} jobs", soft_wrap=True)
    rows: list = [None] * len(models)
    running: dict = {}
    stamp = {"recipes": recipes, "onnx": not args.no_onnx, "onnx_recipes": args.onnx_recipes}
    if args.checkpoint and args.checkpoint.exists():
        done = {}
        for line in args.checkpoint.read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            if entry.get("stamp") == stamp and entry["row"].get("graphprune_src") == GRAPHPRUNE_SRC:
                done[(entry["row"]["source"], entry["row"]["model"])] = entry["row"]
        for index, key in enumerate(models):
            rows[index] = done.get(key)
        console.print(f"{sum(r is not None for r in rows)} models reused from {args.checkpoint}")
    reused = sum(r is not None for r in rows)
    todo = [i for i, r in enumerate(rows) if r is None]
    t_start = time.perf_counter()
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("[dim]{task.fields[current]}")]
    with Progress(*columns, console=console, redirect_stdout=False, redirect_stderr=False) as progress:
        task = progress.add_task("coverage", total=len(models), completed=reused, current="")

        def on_start(index):
            running[index] = models[index][1]
            progress.update(task, current=", ".join(running.values()))

        def on_done(index, row):
            running.pop(index, None)
            rows[index] = row
            if args.checkpoint:
                with open(args.checkpoint, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"stamp": stamp, "row": row}, default=str) + "\n")
            mark = {"pass": "[green]pass[/]", "refused": "[yellow]refused[/]"}.get(row["status"], f"[red]{row['status']}[/]")
            detail = f" [dim]{_md(row.get('reason') or _reason(row), 100)}[/]" if row["status"] != "pass" else ""
            secs = f" ({row['seconds']:.0f} s)" if "seconds" in row else ""
            progress.console.print(f"{mark:>18} {row['model']}{secs}{detail}", soft_wrap=True)
            progress.update(task, advance=1, current=", ".join(running.values()))

        onnx = {r for r in recipes if settings[r].get("onnx", True)} if args.onnx_recipes else not args.no_onnx
        run_models(models, todo, args.jobs, args.threads, onnx, on_start, on_done)

    runtime = time.perf_counter() - t_start
    count = lambda src, st=None: sum(1 for r in rows if r["source"] == src and (st is None or r["status"] == st))  # noqa: E731
    totals = {
        "timm": count("timm"), "timm_pass": count("timm", "pass"), "hf": count("hf"), "hf_pass": count("hf", "pass"),
        **{st: sum(1 for r in rows if r["status"] == st) for st in ("pass", "refused", "fail", "error", "unbuildable")},
    }
    import transformers

    given = sys.argv[1:] if argv is None else list(argv)
    for flag in ("--checkpoint", "--jobs"):  # how the run was scheduled, not what it checked
        given = [a for i, a in enumerate(given)
                 if not (a == flag or a.startswith(flag + "=") or (i and given[i - 1] == flag))]
    command = " ".join(["python benchmarks/coverage.py", *map(shlex.quote, given)])
    data = {
        "command": command,
        "date": datetime.date.today().isoformat(),
        "graphprune": {"git": _git_state(), "source_hash": GRAPHPRUNE_SRC,
                       "rows_from_other_sources": sum(r.get("graphprune_src") != GRAPHPRUNE_SRC for r in rows)},
        "runtime_s": round(runtime, 1),
        "reused_from_checkpoint": reused,
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "transformers": transformers.__version__},
        "threads": args.threads,
        "jobs": args.jobs,
        "onnx": not args.no_onnx,
        "onnx_recipes": [r for r in recipes if settings[r].get("onnx", True)] if args.onnx_recipes else None,
        "recipes": recipes,
        "zero_settings": {k: v["zero"] for k, v in settings.items()},
        "reduce_settings": {k: v["reduce"] for k, v in settings.items()},
        "tolerances": {"zero": ZERO_TOL, "onnx": ONNX_TOL},
        "totals": totals,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_markdown(args.out, data)
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
    console.print(f"[bold]{totals['timm_pass']}/{totals['timm']}[/] timm and [bold]{totals['hf_pass']}/{totals['hf']}[/] "
                  f"HF architectures pass every check; {totals['refused']} refused, {totals['fail']} failed, "
                  f"{totals['error']} crashed, {totals['unbuildable']} unbuildable ({runtime / 60:.1f} min)", soft_wrap=True)
    console.print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
