"""Speed of graphprune recipes against the unmodified model, measured interleaved in one run.

    python benchmarks/speed.py                       # DeiT-S, batch 8, 2 threads, eager + ONNX Runtime
    python benchmarks/speed.py --model deit_tiny_patch16_224 --rounds 5 --json out.json

Each round runs every variant once, in a rotating order, after warm-up; the speedup is the
ratio of medians against the unmodified model measured in the same rounds. ONNX variants
are compared with the unmodified model exported the same way (graphprune with r=0).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import timm
import torch

import graphprune
from graphprune import bench as gb

# every recipe at a setting with about 35 % fewer FLOPs on DeiT-S, plus ToMe's published r = 13 and 16
AT_35 = [
    ("tome", {"r": 11}), ("evit", {"keep": 0.7}), ("tps", {"keep": 0.7}), ("diffrate", {}), ("ppt", {}),
    ("pitome", {"ratio": 0.92}), ("ats", {"capacity": 0.5}), ("zero_tprune", {"keep": 0.7}), ("evo_vit", {"keep": 0.5}),
    ("atc", {"keep": 0.7}), ("tome", {"r": 11, "split": "random"}), ("tome", {"r": 11, "split": "kth", "k": 3}),
]
VARIANTS = AT_35 + [("tome", {"r": 13}), ("tome", {"r": 16})]
ONNX_VARIANTS = AT_35 + [("tome", {"r": 13})]  # ToMe r=13: issue 2's ORT target


def interleaved(fns: dict, x, rounds: int, warmup: int = 3) -> dict:
    """Median seconds per call, every variant run once per round in a rotating order (graphprune.bench)."""
    times = gb.interleaved(fns, (x,), rounds=rounds, warmup=warmup)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--only", help="comma-separated recipe names to measure")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    only = set(args.only.split(",")) if args.only else None
    variants = [(r, o) for r, o in VARIANTS if only is None or r in only]
    onnx_variants = [(r, o) for r, o in ONNX_VARIANTS if only is None or r in only]
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    x = torch.randn(args.batch, 3, 224, 224)
    example = (x[:2],)
    results = {"model": args.model, "batch": args.batch, "threads": args.threads, "eager": {}, "onnx": {}}

    fns = {"baseline": model}
    flops = {}
    for recipe, opts in variants:
        name = f"{recipe} {opts}"
        fast = graphprune.optimize(model, recipe, example_inputs=example, **opts)
        fns[name] = fast
        flops[name] = fast.report.flop_ratio
    med = interleaved(fns, x, args.rounds)
    for name, t in med.items():
        results["eager"][name] = {"median_s": t, "speedup": med["baseline"] / t, "flop_ratio": flops.get(name, 1.0)}

    if not args.no_onnx:
        with tempfile.TemporaryDirectory() as tmp:
            fns = {}
            for recipe, opts in [("tome", {"r": 0})] + onnx_variants:
                name = "baseline" if opts == {"r": 0} else f"{recipe} {opts}"
                exported = graphprune.optimize(model, recipe, target="onnx", output=Path(tmp) / f"{len(fns)}.onnx",
                                               example_inputs=example, **opts)
                fns[name] = graphprune.OnnxModel(exported.path, exported.out_spec, threads=args.threads)
            med = interleaved(fns, x, args.rounds)
            for name, t in med.items():
                results["onnx"][name] = {"median_s": t, "speedup": med["baseline"] / t}

    print(f"{args.model}, batch {args.batch}, {args.threads} threads, {args.rounds} interleaved rounds")
    for target in ("eager", "onnx"):
        for name, r in results[target].items():
            print(f"  {target:5s} {name:24s} {r['median_s'] * 1000:8.1f} ms  {r['speedup']:.2f}x" +
                  (f"  FLOPs {r['flop_ratio']:.3f}" if "flop_ratio" in r else ""))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
