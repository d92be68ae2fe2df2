"""Decode step and prompt pass of every cache recipe on a GPU: Qwen2.5-0.5B's shapes with random weights (built from
its configuration, nothing downloaded), a random prompt, the unmodified model's greedy continuation fed one token per
step, rounds interleaved with the full cache (``graphprune.kv.bench.bench_decoder``).

    python benchmarks/gpu_decode.py --prompt 4096 --steps 64 --rounds 3 --out docs/llm/gpu_decode.json

Random weights: the timings and memory are the real model's; fidelity columns mean nothing and are not reported.
A variant that fails on the device is reported with its error and left out of the timed rounds.
``--tiny`` builds a 2-layer model instead (a quick check of the script on any machine).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import graphprune
from graphprune.kv.bench import bench_decoder

sys.path.insert(0, str(Path(__file__).parent))
from llm import _commit  # noqa: E402  (the commit the run imported, once)

QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                  tie_word_embeddings=True, rms_norm_eps=1e-6)
TINY = dict(QWEN25_05B, vocab_size=1000, num_hidden_layers=2, hidden_size=128, intermediate_size=256,
            num_attention_heads=4, num_key_value_heads=2)
CALIBRATION = object()  # stands for the run's calibration token ids


def settings(steps: int) -> list[tuple[str, str, dict]]:
    return [("streaming_llm 0.25", "streaming_llm", {"budget": 0.25}), ("h2o 0.25", "h2o", {"budget": 0.25}),
            ("tova 0.25", "tova", {"budget": 0.25}), ("scissorhands 0.25", "scissorhands", {"budget": 0.25}),
            ("snapkv 0.25", "snapkv", {"budget": 0.25}), ("pyramidkv 0.25", "pyramidkv", {"budget": 0.25}),
            ("rocketkv 0.25", "rocketkv", {"budget": 0.25, "new_tokens": steps}), ("qhitter", "qhitter", {}),
            ("kivi 4-bit", "kivi", {"bits": 4}), ("kivi 2-bit", "kivi", {"bits": 2}),
            ("gear 4-bit", "gear", {"bits": 4}), ("kvquant 4-bit", "kvquant", {"bits": 4, "calibration": CALIBRATION}),
            ("kvquant 3-bit", "kvquant", {"bits": 3, "calibration": CALIBRATION}),
            ("palu 0.5", "palu", {"ratio": 0.5}), ("palu 0.5 3-bit", "palu", {"ratio": 0.5, "bits": 3})]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=64, help="decode steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--only", nargs="*", help="labels to run (default: all)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    commit = _commit()  # (read as the run starts: the code it runs)
    dtype = getattr(torch, a.dtype)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**(TINY if a.tiny else QWEN25_05B))).eval().to(a.device, dtype)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, vocab, (a.batch, a.prompt), generator=g).to(a.device)
    calibration = torch.randint(2, vocab, (4, 512), generator=g).to(a.device)
    chosen = [s for s in settings(a.steps) if not a.only or s[0] in a.only]
    variants, failed = [], {}
    for label, recipe, options in chosen:
        options = {k: calibration if v is CALIBRATION else v for k, v in options.items()}
        try:  # a short run on the device first: a variant that fails there is reported, not timed
            with torch.inference_mode():
                graphprune.optimize(model, recipe, **options).generate(ids[:, :256], max_new_tokens=4,
                                                                       do_sample=False, pad_token_id=0)
            variants.append((label, recipe, options))
        except Exception as e:  # noqa: BLE001 (reported, with its type)
            failed[label] = f"{type(e).__name__}: {e}"[:300]
            print("FAILED", label, failed[label], flush=True)
    t0 = time.perf_counter()
    results = bench_decoder(model, [(r, o) for _, r, o in variants], ids, new_tokens=a.steps, rounds=a.rounds,
                            progress=False)
    rows = [{"variant": label, "ttft_ms": r.prefill_ms, "ms_per_step": r.latency_ms, "step_speedup": r.speedup,
             "cache": r.fidelity["cache_ratio"]} for (label, _, _), r in zip(variants, results)]
    base = results[0] if results else None
    device = torch.cuda.get_device_name() if a.device == "cuda" else platform.processor() or a.device
    payload = {"command": "python benchmarks/gpu_decode.py " + " ".join(
                   f"--{k.replace('_', '-')} {v}" for k, v in (("prompt", a.prompt), ("batch", a.batch),
                                                               ("steps", a.steps), ("rounds", a.rounds),
                                                               ("dtype", a.dtype))),
               "device": device, "torch": torch.__version__, "commit": commit,
               "date": time.strftime("%Y-%m-%d"), "seconds": round(time.perf_counter() - t0, 1),
               "prompt": a.prompt, "batch": a.batch, "steps": a.steps, "rounds": a.rounds,
               "full": {"ttft_ms": base.baseline_prefill_ms, "ms_per_step": base.baseline_ms} if base else None,
               "rows": rows, "failed": failed}
    print(f"full cache: TTFT {payload['full']['ttft_ms']:.1f} ms, {payload['full']['ms_per_step']:.2f} ms/step"
          if base else "no variant ran")
    for r in rows:
        print(f"{r['variant']:<22} TTFT {r['ttft_ms']:8.1f} ms  {r['ms_per_step']:7.2f} ms/step "
              f"({r['step_speedup']:.2f}x)  cache {r['cache']:.3f}", flush=True)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
