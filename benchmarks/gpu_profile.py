"""Where a GPU spends ToMe's and EViT's time on a DINOv2-S-shaped model at 448 px, batch 8, float16 (needs CUDA).

    python benchmarks/gpu_profile.py profile   # wall ms per pass, then torch's profiler tables (host and GPU time)
    python benchmarks/gpu_profile.py graphs    # eager against torch.compile(mode="reduce-overhead") (CUDA graphs)

Printed, not written: docs/highres.md quotes the numbers of one run with the command that made them.
"""

from __future__ import annotations

import sys
import time

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import graphprune


def _model_and_input():
    torch.manual_seed(0)
    m = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=448).eval().cuda().half()
    return m, torch.randn(8, 3, 448, 448).cuda().half()


def run_profile() -> None:
    m, x = _model_and_input()
    for label, rec, opt in [("base", None, {}), ("tome", "tome", {"r": 60}),
                            ("tome_noprop", "tome", {"r": 60, "prop_attn": False}), ("tome_r0", "tome", {"r": 0}),
                            ("evit", "evit", {"keep": 0.7})]:
        f = m if rec is None else graphprune.optimize(m, rec, example_inputs=(x,), **opt)
        with torch.inference_mode():
            for _ in range(3):
                f(x)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(10):
                f(x)
            torch.cuda.synchronize()
            print("###", label, round((time.perf_counter() - t) / 10 * 1e3, 2), "ms", flush=True)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
                f(x)
                torch.cuda.synchronize()
        if rec is not None and label != "tome_r0":
            print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
            print(p.key_averages().table(sort_by="self_cuda_time_total", row_limit=10))


def run_graphs() -> None:
    m, x = _model_and_input()
    fns = {"base": m, "tome": graphprune.optimize(m, "tome", example_inputs=(x,), r=60),
           "evit": graphprune.optimize(m, "evit", example_inputs=(x,), keep=0.7)}
    with torch.inference_mode():
        ref = {k: f(x) for k, f in fns.items()}
        comp = {}
        for k, f in fns.items():
            t = time.perf_counter()
            c = torch.compile(f, mode="reduce-overhead")
            for _ in range(3):
                y = c(x)
            torch.cuda.synchronize()
            print(k, "compiled in", round(time.perf_counter() - t, 1), "s; max diff",
                  float((y.float() - ref[k].float()).abs().max()), flush=True)
            comp[k] = c
        for name, group in (("eager", fns), ("compiled", comp)):
            ms = {k: [] for k in group}
            for _ in range(20):
                for k, f in group.items():
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    f(x)
                    torch.cuda.synchronize()
                    ms[k].append((time.perf_counter() - t) * 1e3)
            med = {k: sorted(v)[10] for k, v in ms.items()}
            print(name, {k: round(v, 2) for k, v in med.items()},
                  "speedup", {k: round(med["base"] / v, 2) for k, v in med.items()}, flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("profile", "graphs") or not torch.cuda.is_available():
        raise SystemExit("usage: python benchmarks/gpu_profile.py profile|graphs (needs a CUDA GPU)")
    {"profile": run_profile, "graphs": run_graphs}[sys.argv[1]]()
