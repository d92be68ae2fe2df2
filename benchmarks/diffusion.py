"""Speed of ToMe for Stable Diffusion per denoising step, against the unmodified denoiser and the official ``tomesd``.

    python benchmarks/diffusion.py --models sd15 --latents 64 --rounds 3       # docs/diffusion/<model>-<latent>.json
    python benchmarks/diffusion.py --models dit-xl --latents 32 64 --rounds 3
    python benchmarks/diffusion.py --report                                     # docs/diffusion.md

Random weights at the real shapes: Stable Diffusion 1.5's UNet (64×64 latents: 512² images; 128×128: 1024²) and
DiT-XL/2 (32×32 latents: 256²; 64×64: 512²). One denoising step = one call with a classifier-free-guidance batch of 2 (``--batch 2K``: K prompts).
Variants, timed interleaved (``graphprune.bench.interleaved``): the unmodified denoiser, graphprune's ``tomesd``
(ratio 0.5, defaults otherwise) and, where installed, the official ``tomesd`` 0.1.3 patched into a private copy (on
DiT with ``max_downsample=2``, which reaches the same patch grid). FLOPs counted by ``graphprune.report``'s counter
(the matching's similarity and merges included); bound = 1 / FLOP ratio; efficiency = speedup / bound.
``--targets eager onnx`` adds ONNX Runtime (unmodified and reduced, both exported here); ``--targets onnx`` times
ONNX Runtime alone (no eager variants or official copy in memory: what fits SD 1.5's UNet on a 24 GB machine;
``<model>-<latent>-onnx.json``). ONNX Runtime runs each exported graph's copy with fused attention (its
MultiHeadAttention, see ``graphprune.exporters.ort_attention``; the JSON's ``onnx_fused_attention`` counts them),
each session handing its working memory back after each step (``OnnxDenoiser(release_memory=True)``).
``--device cuda --dtype float16``
runs on a GPU; ``--compile`` adds ``torch.compile`` of the unmodified and the reduced denoiser (and of the official
patch, where installed), each compiled once before the timed rounds (compile time reported apart).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from llm import _commit  # noqa: E402  (the commit the run imported, once)

OUT = Path(__file__).parent.parent / "docs" / "diffusion"
RATIO = 0.5


def build(name: str, latent: int, device: str = "cpu", dtype: torch.dtype = torch.float32, batch: int = 2):
    """(denoiser, its keyword inputs for one guidance step) with random weights at the real configuration, on
    ``device`` in ``dtype``."""
    model, inputs = _build(name, latent, batch)
    cast = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}
    return model.to(device, dtype), cast


def _build(name: str, latent: int, batch: int):
    import diffusers

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "sd15":
        model = diffusers.UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
            attention_head_dim=8)
        inputs = {"sample": torch.randn(batch, 4, latent, latent, generator=g),
                  "timestep": torch.full((batch,), 500), "encoder_hidden_states": torch.randn(batch, 77, 768, generator=g)}
    elif name == "dit-xl":
        model = diffusers.DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4,
                                                out_channels=8, num_layers=28, sample_size=latent, patch_size=2,
                                                num_embeds_ada_norm=1000)
        inputs = {"hidden_states": torch.randn(batch, 4, latent, latent, generator=g),
                  "timestep": torch.full((batch,), 500), "class_labels": torch.tensor([1, 1000]).repeat(batch // 2)}
    else:
        raise SystemExit(f"unknown model {name}")
    return model.eval(), inputs


def official(model, name: str, max_downsample: int):
    try:
        import tomesd
    except ImportError:
        return None
    twin = copy.deepcopy(model)  # (the package counts DiT's downsampling from the latent: its patch grid is 2)
    tomesd.apply_patch(twin, ratio=RATIO, max_downsample=max_downsample * (2 if name == "dit-xl" else 1))
    return twin


def run(name: str, latent: int, rounds: int, targets: list[str], commit: str, max_downsample: int = 1,
        device: str = "cpu", dtype: str = "float32", compile: bool = False, batch: int = 2) -> dict:
    import graphprune
    from graphprune.bench import interleaved
    from graphprune.exporters.denoiser_onnx import OnnxDenoiser
    from graphprune.report import count_flops

    model, inputs = build(name, latent, device, getattr(torch, dtype), batch)
    options = {"ratio": RATIO, "seed": 0, "max_downsample": max_downsample}
    fast = graphprune.optimize(model, "tomesd", **options)
    first, rest = next(iter(inputs.values())), dict(list(inputs.items())[1:])  # (tomesd's hook reads the latent
    # from the first positional argument: every variant is called so)
    fns = {}
    if "eager" in targets:  # (ONNX Runtime alone: no eager variants, and no copy of the model for the official one)
        fns = {"unmodified": lambda: model(first, **rest), "graphprune tomesd": lambda: fast(first, **rest)}
        theirs = official(model, name, max_downsample)
        if theirs is not None:
            fns["official tomesd"] = lambda: theirs(first, **rest)
    compile_s = {}
    if compile:
        for k in list(fns):
            f = fns[k]
            compiled = torch.compile(f)
            t0 = time.perf_counter()
            with torch.inference_mode():
                compiled()
                compiled()
            if device == "cuda":
                torch.cuda.synchronize()
            compile_s["compiled " + k] = time.perf_counter() - t0
            fns["compiled " + k] = compiled
            print(f"compiled {k} in {compile_s['compiled ' + k]:.0f} s", flush=True)
    tmp, fused = None, {}
    if "onnx" in targets:
        tmp = tempfile.TemporaryDirectory()
        folders = {"plain": Path(tmp.name) / "plain", "tomesd": Path(tmp.name) / "tomesd"}
        for key, settings in (("plain", {"ratio": 0.0}), ("tomesd", options)):  # exported one at a time, each
            # runtime session dropped before the next export (a full UNet's are gigabytes each)
            graphprune.optimize(model, "tomesd", **settings, target="onnx", output=folders[key], example_inputs=inputs)
            gc.collect()
        plain, reduced = (OnnxDenoiser(folders[key], release_memory=True) for key in ("plain", "tomesd"))  # (each
        # step's working memory handed back: two SD 1.5 sessions at 1024² would keep about 7 GB each)
        fns["onnx unmodified"] = lambda: plain(**inputs)
        fns["onnx graphprune tomesd"] = lambda: reduced(**inputs)
        fused = {"onnx unmodified": plain.meta.get("fused_attention", 0),
                 "onnx graphprune tomesd": reduced.meta.get("fused_attention", 0)}  # (ONNX Runtime's MHA)
    ratio = count_flops(lambda: fast(**inputs), ()) / count_flops(lambda: model(**inputs), ())
    times = interleaved(fns, (), rounds=rounds, warmup=1)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    row = {"model": name, "latent": latent, "image": latent * 8, "batch": batch, "ratio": RATIO,
           "max_downsample": max_downsample, "flop_ratio": ratio,
           "bound": 1 / ratio, "seconds": med,
           "speedup": {k: med["unmodified"] / v for k, v in med.items() if not k.startswith(("onnx", "compiled"))}
           if "unmodified" in med else {},
           "device": _device_name(device), "dtype": dtype, "compile_s": compile_s,
           "threads": torch.get_num_threads(), "rounds": rounds, "commit": commit,
           "command": "python benchmarks/diffusion.py " + " ".join(sys.argv[1:]),
           "date": datetime.date.today().isoformat()}
    for k in med:
        if k.startswith("compiled ") and k != "compiled unmodified":
            row["speedup"][k] = med["compiled unmodified"] / med[k]
    if "onnx unmodified" in med:
        row["speedup"]["onnx graphprune tomesd"] = med["onnx unmodified"] / med["onnx graphprune tomesd"]
        row["onnx_fused_attention"] = fused  # attentions run as ONNX Runtime's MultiHeadAttention, per graph
    row["efficiency"] = {k: v / row["bound"] for k, v in row["speedup"].items() if "tomesd" in k}
    if tmp is not None:
        tmp.cleanup()
    return row


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def _where(r: dict) -> str:
    """The runtime of a row: ``cpu, N threads`` or the GPU and dtype."""
    device = r.get("device", "cpu")
    return f"cpu, {r['threads']} threads" if device == "cpu" else f"{device}, {r.get('dtype', 'float32')}"


def _image(r: dict) -> str:
    return f"{r['image']}²" + (f", batch {r['batch']}" if r["batch"] != 2 else "")


def _time(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.1f} ms"


def report() -> None:
    rows = sorted((json.loads(p.read_text()) for p in OUT.glob("*.json")),
                  key=lambda r: (r.get("device", "cpu") != "cpu", r["model"], r["image"], r["batch"],
                                 r.get("max_downsample", 1)))
    lines = ["# Diffusion: ToMe for Stable Diffusion per denoising step", "",
             "Generated by `python benchmarks/diffusion.py --report` from the runs in `docs/diffusion/` (each row "
             "names its command). Random weights at the real shapes, a guidance batch of 2, ratio 0.5; times are "
             "medians of interleaved rounds; bound = 1 / FLOP ratio (the matching's own FLOPs counted).", "",
             "| model | image | FLOP ratio | bound | baseline | variant | time | speedup | of bound | runtime | "
             "command |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        seconds = r["seconds"]
        setting = f" (max_downsample={r['max_downsample']})" if r.get("max_downsample", 1) != 1 else ""
        for k, v in seconds.items():
            if k == "unmodified":
                continue
            family = k.split(" ")[0] if k.startswith(("onnx", "compiled")) else ""
            base_k = seconds[f"{family} unmodified"] if family else seconds["unmodified"]
            label = k + setting if "tomesd" in k else k
            if r.get("onnx_fused_attention", {}).get(k):  # (ONNX Runtime's MultiHeadAttention: see the module doc)
                label += " (fused attention)"
            if k.endswith(" unmodified"):
                eager = seconds.get("unmodified")
                lines.append(f"| {r['model']} | {_image(r)} | | | {_time(eager) if eager else ''} | {label} | "
                             f"{_time(v)} | {f'{eager / v:.2f}× vs eager' if eager else ''} | | {_where(r)} | "
                             f"`{r['command']}` |")
                continue
            speed = base_k / v
            eff = f"{speed * r['flop_ratio']:.2f}" if "tomesd" in k else ""
            lines.append(f"| {r['model']} | {_image(r)} | {r['flop_ratio']:.3f} | {r['bound']:.2f}× | "
                         f"{_time(base_k)} | {label} | {_time(v)} | {speed:.2f}× | {eff} | {_where(r)} | "
                         f"`{r['command']}` |")
    doc = Path(__file__).parent.parent / "docs" / "diffusion.md"
    text = doc.read_text() if doc.is_file() else ""
    marker = "<!-- benchmark table -->"
    table = "\n".join(lines[4:])
    if marker in text:
        head, _, rest = text.partition(marker)
        tail = rest.partition("<!-- end -->")[2]
        doc.write_text(f"{head}{marker}\n{table}\n<!-- end -->{tail}")
    else:
        doc.write_text("\n".join(lines[:4]) + f"\n\n{marker}\n{table}\n<!-- end -->\n")
    print(doc.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["sd15"], choices=("sd15", "dit-xl"))
    parser.add_argument("--latents", type=int, nargs="+", default=[64])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--targets", nargs="+", default=["eager"], choices=("eager", "onnx"))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--max-downsample", type=int, default=1,
                        help="merge at token grids up to this factor coarser than the finest (published default 1)")
    parser.add_argument("--batch", type=int, default=2, help="samples per step, an even number (guidance pairs)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of every variant")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    if args.batch < 2 or args.batch % 2:
        parser.error("--batch must be an even number (guidance pairs)")
    if args.report:
        return report()
    if args.threads:
        torch.set_num_threads(args.threads)
    commit = _commit()
    OUT.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        for latent in args.latents:
            row = run(name, latent, args.rounds, args.targets, commit, args.max_downsample, args.device, args.dtype,
                      args.compile, args.batch)
            print(json.dumps(row, indent=1), flush=True)
            suffix = f"-md{args.max_downsample}" if args.max_downsample != 1 else ""
            suffix += f"-{args.device}-{args.dtype}" if args.device != "cpu" else ""
            suffix += "-compile" if args.compile else ""
            suffix += f"-b{args.batch}" if args.batch != 2 else ""
            suffix += "-onnx" if "eager" not in args.targets else ""
            (OUT / f"{name}-{latent}{suffix}.json").write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
