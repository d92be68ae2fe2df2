"""Speed at high resolution, eager and ONNX Runtime, against the bound the FLOP ratio gives.

    python benchmarks/highres.py --sizes 448 518 --batches 1 8 --rounds 5      # docs/highres.md

Each run keeps its rows in ``docs/highres/<targets>-b<batches>.json``; docs/highres.md shows every run's table, each with
the command that made it.

    python benchmarks/highres.py --profile --sizes 448 --batches 8 --threads 1   # docs/highres/profile.json
    python benchmarks/highres.py --profile --targets eager --sizes 448 --batches 1 --threads 1   # profile_eager.json
    python benchmarks/highres.py --device cuda --dtype float16 --batches 1 8 32 --targets eager   # on a GPU

``--profile``: where ONNX Runtime spends its time, per operator type, in ToMe's exported model and in the unmodified
one (``tome`` with r=0), from ONNX Runtime's own profiler over two runs each.

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
    parser.add_argument("--profile", action="store_true", help="time per operator type instead: ONNX Runtime's "
                        "profiler (with --targets eager: torch's)")
    parser.add_argument("--device", default=None, help="cpu (default) or cuda: the eager target on a GPU")
    parser.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"))
    args = parser.parse_args()
    commit = _commit()  # (read as the run starts: the code it runs)
    if args.profile:
        if args.targets == ["eager"]:
            return profile_eager(args.sizes[0], args.batches[0], args.threads or 1, commit)
        return profile(args.sizes[0], args.batches[0], args.threads or 1, commit)
    import timm

    from graphprune.bench import sweep

    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = args.device or "cpu", getattr(torch, args.dtype or "float32")
    on_gpu = device != "cpu"
    if on_gpu and args.targets != ["eager"]:
        raise SystemExit("--device applies to --targets eager (the exported runtimes run on the CPU here)")
    rows = []
    for size in args.sizes:
        torch.manual_seed(0)
        model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=size).eval().to(device, dtype)
        variants = [("tome", {"r": TOME_R[size]}), ("evit", {"keep": 0.7})]
        for batch in args.batches:
            x = torch.randn(batch, 3, size, size).to(device, dtype)
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
        f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items()
        if v is not None and v is not False)
    payload = {"date": datetime.date.today().isoformat(), "commit": commit, "threads": torch.get_num_threads(),
               "runtime_threads": torch.get_num_threads(), "command": command, "rows": rows}  # (every runtime's)
    if on_gpu:
        payload["device"] = f"{torch.cuda.get_device_name()}, {args.dtype or 'float32'}"
    (OUT / "highres").mkdir(parents=True, exist_ok=True)
    name = f"{'-'.join(args.targets)}{'-' + args.device if on_gpu else ''}-b{'-'.join(map(str, args.batches))}.json"
    (OUT / "highres" / name).write_text(json.dumps(payload, indent=2))
    report()


def profile(size: int, batch: int, threads: int, commit: str) -> None:
    """ONNX Runtime's profiler over ToMe's exported model and the unmodified one: milliseconds per operator type (mean
    of two runs; the additions over the attention logits apart), printed and written to docs/highres/profile.json."""
    import collections
    import tempfile

    import onnxruntime as ort
    import timm

    import graphprune

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=size).eval()
    x = torch.randn(batch, 3, size, size)
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, r in (("unmodified", 0), (f"tome(r={TOME_R[size]})", TOME_R[size])):
            path = Path(tmp) / f"r{r}.onnx"
            graphprune.optimize(model, "tome", r=r, target="onnx", output=path, example_inputs=(x[:2],))
            options = ort.SessionOptions()
            options.intra_op_num_threads, options.enable_profiling = threads, True
            options.profile_file_prefix = str(Path(tmp) / f"profile_r{r}")
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            feed = {session.get_inputs()[0].name: x.numpy()}
            for _ in range(2):
                session.run(None, feed)
            per_op = collections.Counter()
            for event in json.loads(Path(session.end_profiling()).read_text()):
                if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                    op, shapes = event["args"]["op_name"], event["args"].get("output_type_shape") or [{}]
                    if op == "Add" and len(next(iter(shapes[0].values()), [])) == 4:
                        op = "Add (B, H, N, N)"  # (over the attention logits: proportional attention's bias)
                    per_op[op] += event["dur"] / 2e3  # (µs over two runs → ms per run)
            times[label] = dict(per_op)
    base, tome = times.values()
    for op in sorted(set(base) | set(tome), key=lambda o: -tome.get(o, 0)):
        print(f"{op:24s} unmodified {base.get(op, 0):8.1f} ms   tome {tome.get(op, 0):8.1f} ms")
    print(f"total: unmodified {sum(base.values()):.0f} ms, tome {sum(tome.values()):.0f} ms")
    command = f"python benchmarks/highres.py --profile --sizes {size} --batches {batch} --threads {threads}"
    payload = {"date": datetime.date.today().isoformat(), "commit": commit, "command": command, "ms_per_op": times}
    (OUT / "highres").mkdir(parents=True, exist_ok=True)
    (OUT / "highres" / "profile.json").write_text(json.dumps(payload, indent=2))


def profile_eager(size: int, batch: int, threads: int, commit: str) -> None:
    """torch's profiler over eager ToMe and the unmodified model: milliseconds per pass by aten operator (three passes
    each after a warm-up), and graphprune's merges as a whole; written to docs/highres/profile_eager.json."""
    import timm
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    import graphprune

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=size).eval()
    x = torch.randn(batch, 3, size, size)
    fast = graphprune.optimize(model, "tome", r=TOME_R[size], example_inputs=(torch.randn(2, 3, size, size),))
    times = {}
    with torch.inference_mode():
        for label, m in (("unmodified", model), (f"tome(r={TOME_R[size]})", fast)):
            m(x)
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    m(x)
            ops = {e.key: e.self_cpu_time_total / 3e3 for e in prof.key_averages()}  # (µs over three → ms per pass)
            ops["graphprune::tome_merge (with its children)"] = next(
                (e.cpu_time_total / 3e3 for e in prof.key_averages() if e.key == "graphprune::tome_merge"), 0.0)
            times[label] = ops
    base, tome = times.values()
    for op in sorted(set(base) | set(tome), key=lambda o: -tome.get(o, 0))[:15]:
        print(f"{op:48s} unmodified {base.get(op, 0):8.1f} ms   tome {tome.get(op, 0):8.1f} ms")
    command = f"python benchmarks/highres.py --profile --targets eager --sizes {size} --batches {batch} --threads {threads}"
    payload = {"date": datetime.date.today().isoformat(), "commit": commit, "command": command, "ms_per_pass": times}
    (OUT / "highres").mkdir(parents=True, exist_ok=True)
    (OUT / "highres" / "profile_eager.json").write_text(json.dumps(payload, indent=2))


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
        if "rows" not in run:  # (the profile: in the notes)
            continue
        where = run.get("device") or f"{run['threads']} threads"
        if "runtime_threads" not in run and any(r["target"] != "eager" for r in run["rows"]):
            where = (f"torch on {run['threads']}; ONNX Runtime and OpenVINO on their default, both cores: before "
                     "commit 203ad3d the exported models' sessions ignored --threads")
        lines += ["", f"`{run['command']}` ({run['date']}, commit {run['commit']}, {where})", "",
                  "| px | batch | runtime | recipe | unmodified ms | ms | speedup | FLOP ratio | bound | efficiency |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in run["rows"]:
            ms = ".1f" if r["baseline_ms"] < 100 else ".0f"
            lines.append(f"| {r['size']} | {r['batch']} | {r['target']} | `{r['recipe']}` | {r['baseline_ms']:{ms}} | "
                         f"{r['latency_ms']:{ms}} | {r['speedup']:.2f}× | {r['flop_ratio']:.3f} | {r['bound']:.2f}× | "
                         f"{r['efficiency']:.2f} |")
    doc.write_text("\n".join(lines) + "\n\n<!-- notes -->" + notes)
    print(f"wrote {doc}")


if __name__ == "__main__":
    main()
