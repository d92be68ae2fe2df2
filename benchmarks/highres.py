"""Speed at high resolution, eager and ONNX Runtime, against the bound the FLOP ratio gives.

    python benchmarks/highres.py --sizes 448 518 --batches 1 8 --rounds 5      # docs/highres.md

Each run keeps its rows in ``docs/highres/<targets>-b<batches>.json``; docs/highres.md shows every run's table, each with
the command that made it.

Model: timm's ``vit_small_patch14_dinov2`` (DINOv2-S shape, random weights) at 448 px (1025 tokens) and 518 px (1370
tokens). Recipes: ToMe r=60 (448) / r=80 (518), EViT keep 0.7. For each target and batch, the unmodified model and the
recipes run interleaved (``graphprune.bench.sweep``); the FLOP bound is 1 / FLOP ratio (the reduction's own FLOPs
counted); efficiency = measured speedup / bound (target ≥ 0.9).
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch

from llm import _commit  # (the commit the run imported, once)

OUT = Path(__file__).parent.parent / "docs"
TOME_R = {448: 60, 518: 80}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[448, 518], choices=(448, 518))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--targets", nargs="+", default=["eager", "onnx"], choices=("eager", "onnx", "openvino"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    commit = _commit()  # (read as the run starts: the code it runs)
    import timm

    from graphprune.bench import sweep

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for size in args.sizes:
        torch.manual_seed(0)
        model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=size).eval()
        variants = [("tome", {"r": TOME_R[size]}), ("evit", {"keep": 0.7})]
        for batch in args.batches:
            x = torch.randn(batch, 3, size, size)
            for target in args.targets:
                print(f"{size} px, batch {batch}, {target}", flush=True)
                for r in sweep(model, variants, (x,), target=target, rounds=args.rounds, warmup=1, memory=False,
                               progress=False):
                    bound = 1 / r.flop_ratio
                    rows.append({"size": size, "batch": batch, "target": target, "recipe": r.label,
                                 "baseline_ms": r.baseline_ms, "latency_ms": r.latency_ms, "speedup": r.speedup,
                                 "flop_ratio": r.flop_ratio, "bound": bound, "efficiency": r.speedup / bound})
                    print(rows[-1], flush=True)
    command = "python benchmarks/highres.py " + " ".join(
        f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items() if v is not None)
    payload = {"date": datetime.date.today().isoformat(), "commit": commit, "threads": torch.get_num_threads(),
               "command": command, "rows": rows}
    (OUT / "highres").mkdir(parents=True, exist_ok=True)
    name = f"{'-'.join(args.targets)}-b{'-'.join(map(str, args.batches))}.json"
    (OUT / "highres" / name).write_text(json.dumps(payload, indent=2))
    report()


def report() -> None:
    """docs/highres.md: every run's table (docs/highres/*.json), each with its command; the notes below are kept."""
    doc = OUT / "highres.md"
    notes = doc.read_text().split("<!-- notes -->", 1)[1] if "<!-- notes -->" in doc.read_text() else "\n"
    lines = ["# High resolution: measured speedup against the FLOP bound", "",
             "DINOv2-S shape (timm `vit_small_patch14_dinov2`, random weights); bound = 1 / FLOP ratio (the reduction's "
             "own FLOPs counted); efficiency = speedup / bound (target ≥ 0.9). Merges lower to ONNX as ScatterElements "
             "additions (O(k·C) per merge)."]
    for path in sorted((OUT / "highres").glob("*.json")):
        run = json.loads(path.read_text())
        lines += ["", f"`{run['command']}` ({run['date']}, commit {run['commit']}, {run['threads']} threads)", "",
                  "| px | batch | runtime | recipe | unmodified ms | ms | speedup | FLOP ratio | bound | efficiency |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in run["rows"]:
            lines.append(f"| {r['size']} | {r['batch']} | {r['target']} | `{r['recipe']}` | {r['baseline_ms']:.0f} | "
                         f"{r['latency_ms']:.0f} | {r['speedup']:.2f}× | {r['flop_ratio']:.3f} | {r['bound']:.2f}× | "
                         f"{r['efficiency']:.2f} |")
    doc.write_text("\n".join(lines) + "\n\n<!-- notes -->" + notes)
    print(f"wrote {doc}")


if __name__ == "__main__":
    main()
