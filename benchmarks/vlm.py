"""Visual-token reduction on a LLaVA-1.5-shaped vision-language model with random weights (no VLM weights install
offline; fidelity rests on the tests' references).

    python benchmarks/vlm.py speed --batch 1 4 --rounds 3      # docs/vlm/speed.json, then docs/vlm.md
    python benchmarks/vlm.py video --rounds 3                  # DyCoke on a video: docs/vlm/video.json, docs/vlm.md
    python benchmarks/vlm.py speed --device cuda --dtype bfloat16 --batch 1 8   # on a GPU: docs/vlm/speed_cuda.json

The model: CLIP ViT-L/14 at 336 pixels (576 image tokens from its second-to-last layer, as LLaVA-1.5 takes them), a
two-layer MLP projector and a language model of Qwen2.5-0.5B's shape (24 layers, 14 query and 2 KV heads, width 896).
The prompt: 35 text tokens, the image, 30 text tokens (LLaVA-1.5's template). Each recipe at its published setting is
timed interleaved with the unmodified model, round by round in a rotating order: time to first token (the prompt pass,
vision tower included), the language model's share of it, decode ms per step, KV memory after the prompt, and the
FLOPs of the prompt pass counted by ``torch.utils.flop_counter`` (every matmul and attention call, the recipes'
own scoring included).

``video``: DyCoke needs a video, which LLaVA-1.5 does not take: a Qwen2-VL-shaped model (Qwen2-VL-2B's vision tower:
32 layers of width 1280, 14-pixel patches of two frames, merged 2×2; the same Qwen2.5-0.5B-shaped language model with
multimodal RoPE), 8 frames of 224×224 pixels (4 temporal patches of 16×16: 256 video tokens) between 20 and 10 text
tokens, batch 1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import graphprune  # noqa: E402
from graphprune.bench import clock  # noqa: E402
from graphprune.report import flop_counter  # noqa: E402
from llm import _commit  # noqa: E402

OUT = Path(__file__).parent.parent / "docs" / "vlm"
IMAGE = 151655  # the placeholder id (Qwen2.5's <|image_pad|>)
VARIANTS = {  # recipe: its published setting
    "fastv": {"layer": 2, "ratio": 0.5},
    "pyramiddrop": {"keep": 0.5},
    "divprune": {"keep": 0.098},
    "prumerge": {"keep": 0.125},  # the authors' fixed-ratio option (72 + 1 tokens): with random weights the adaptive
    # count (IQR outliers of the class attention) says nothing about real images
    "pact": {"layer": 4, "keep": 0.55, "cutoff": 0.21},  # LLaVA-OneVision's (random keys barely cluster: mostly EUTI)
    "turbo": {"r": 16, "alpha": 5.0},  # the authors' LLaVA-1.5 setting (their Folder repository's clip_encoder.py)
}


def llava_shaped():
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


def inputs(batch: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.randint(0, 150000, (batch, 35), generator=g), torch.full((batch, 576), IMAGE),
                     torch.randint(0, 150000, (batch, 30), generator=g)], 1)
    return {"input_ids": ids, "pixel_values": torch.randn(batch, 3, 336, 336, generator=g)}


VIDEO = 151656  # Qwen2-VL's <|video_pad|>


def qwen2_vl_shaped():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]})
    vision = dict(depth=32, embed_dim=1280, hidden_size=896, num_heads=16, mlp_ratio=4, patch_size=14,
                  temporal_patch_size=2, spatial_merge_size=2)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
                           vision_start_token_id=151652, vision_end_token_id=151653)
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(config).eval()


def video_inputs(batch: int) -> dict:
    g = torch.Generator().manual_seed(0)
    t, h, w = 4, 16, 16  # temporal patches, patch rows, patch columns
    tokens = t * h * w // 4
    ids = torch.cat([torch.randint(0, 150000, (batch, 20), generator=g), torch.full((batch, tokens), VIDEO),
                     torch.randint(0, 150000, (batch, 10), generator=g)], 1)
    return {"input_ids": ids, "pixel_values_videos": torch.randn(batch * t * h * w, 3 * 2 * 14 * 14, generator=g),
            "video_grid_thw": torch.tensor([[t, h, w]] * batch),
            "mm_token_type_ids": (ids == VIDEO).int() * 2}


def _vision(model, kw):
    """The image side of the prompt pass: the model's tower and projector, or the recipe's own (Turbo: reduced)."""
    if "pixel_values_videos" in kw:
        return model.model.get_video_features(pixel_values_videos=kw["pixel_values_videos"],
                                              video_grid_thw=kw["video_grid_thw"])
    own = getattr(getattr(model, "graphprune", None), "images", None)
    if own is not None:
        return own(kw["pixel_values"])
    return model.model.get_image_features(pixel_values=kw["pixel_values"], vision_feature_layer=-2,
                                          vision_feature_select_strategy="default")


def _vision_seconds(model, kw) -> float:
    start = clock()
    _vision(model, kw)
    return clock() - start


def _measure(model, kw, steps: int) -> dict:
    start = clock()
    out = model(**kw, use_cache=True)
    ttft = clock() - start
    cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    start = clock()
    for _ in range(steps):
        out = model(input_ids=token, cache=cache, use_cache=True)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    step = (clock() - start) / steps
    nbytes = cache.nbytes if hasattr(cache, "nbytes") else sum(
        t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return {"ttft": ttft, "step": step, "kv_bytes": nbytes}


def _flops(model, kw) -> tuple[int, int]:
    """FLOPs of the prompt pass: all, and the vision tower's and projector's."""
    with flop_counter() as all_flops:  # (graphprune's token ops counted too: Turbo's merges in the tower)
        model(**kw, use_cache=True)
    with flop_counter() as vision:
        _vision(model, kw)
    return all_flops.get_total_flops(), vision.get_total_flops()


def run_speed(batches: list[int], rounds: int, steps: int, threads: int | None, video: bool = False,
              device: str = "cpu", dtype: str = "float32") -> None:
    if threads:
        torch.set_num_threads(threads)
    base = (qwen2_vl_shaped() if video else llava_shaped()).to(device, getattr(torch, dtype))
    variants = {"dycoke": {"layer": 3, "prune": 0.7, "merge": 0.7}} if video else VARIANTS
    models = {"unmodified": base, **{f"{r} {o}": graphprune.optimize(base, r, **o) for r, o in variants.items()}}
    began, rows = time.perf_counter(), []
    with torch.inference_mode():
        for batch in batches:
            kw = {k: v.to(device=device, dtype=getattr(torch, dtype) if v.is_floating_point() else v.dtype)
                  for k, v in (video_inputs(batch) if video else inputs(batch)).items()}
            flops = {name: _flops(m, kw) for name, m in models.items()}
            vision = {name: statistics.median(_vision_seconds(m, kw) for _ in range(2)) for name, m in models.items()}
            times: dict[str, list[dict]] = {name: [] for name in models}
            for name, m in models.items():  # warm-up
                _measure(m, kw, 2)
            names = list(models)
            for r in range(rounds):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    times[name].append(_measure(m := models[name], kw, steps))
                    print(f"batch {batch} round {r + 1}/{rounds} {name:40s} ttft {times[name][-1]['ttft']:.2f} s "
                          f"step {1000 * times[name][-1]['step']:.0f} ms", flush=True)
            med = {name: {k: statistics.median(t[k] for t in ts) for k in ts[0]} for name, ts in times.items()}
            ref = med["unmodified"]
            for name in models:
                m, (total, vis) = med[name], flops[name]
                rows.append({
                    "batch": batch, "variant": name, "ttft_s": m["ttft"], "lm_prefill_s": m["ttft"] - vision[name],
                    "decode_ms": 1000 * m["step"], "kv_bytes": m["kv_bytes"], "flops": total, "vision_flops": vis,
                    "ttft_speedup": ref["ttft"] / m["ttft"],
                    "lm_prefill_speedup": (ref["ttft"] - vision["unmodified"]) / (m["ttft"] - vision[name]),
                    "flop_bound": flops["unmodified"][0] / total,
                    "lm_flop_bound": (flops["unmodified"][0] - flops["unmodified"][1]) / (total - vis),
                    "decode_speedup": ref["step"] / m["step"], "kv_ratio": m["kv_bytes"] / ref["kv_bytes"]})
            print(f"batch {batch}: vision tower {vision['unmodified']:.2f} s", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    result = {"date": datetime.date.today().isoformat(), "commit": _commit(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "rounds": rounds, "steps": steps, "dtype": dtype,
              "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "command": "python benchmarks/vlm.py " + " ".join(sys.argv[1:]),
              "seconds": round(time.perf_counter() - began), "rows": rows}
    name = ("video" if video else "speed") + ("" if device == "cpu" else f"_{device}")
    (OUT / f"{name}.json").write_text(json.dumps(result, indent=1))
    report(name)


def report(name: str = "speed") -> None:
    """docs/vlm.md's measured table from docs/vlm/{name}.json (the prose around it is written by hand)."""
    data = json.loads((OUT / f"{name}.json").read_text())
    gpu = data.get("device", "cpu") != "cpu"
    where, unit = (f"{data['device']}, {data['dtype']}", 1000) if gpu else (f"{data['threads']} threads", 1)
    lines = [f"`{data['command']}` ({data['date']}, commit {data['commit']}, {where}, median of "
             f"{data['rounds']} interleaved rounds, {data['steps']} decode steps each, "
             f"{data['seconds'] / 60:.1f} min)", "",
             f"| batch | variant | TTFT {'s' if unit == 1 else 'ms'} | speedup | FLOP bound | LM prefill speedup | LM FLOP bound | decode ms/step "
             "| decode speedup | KV memory | vision FLOP share |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        lines.append(f"| {r['batch']} | {r['variant']} | {unit * r['ttft_s']:.2f} | {r['ttft_speedup']:.2f}× | "
                     f"{r['flop_bound']:.2f}× | {r['lm_prefill_speedup']:.2f}× | {r['lm_flop_bound']:.2f}× | "
                     f"{r['decode_ms']:.0f} | {r['decode_speedup']:.2f}× | {r['kv_ratio']:.3f} | "
                     f"{r['vision_flops'] / r['flops']:.2f} |")
    doc = Path(__file__).parent.parent / "docs" / "vlm.md"
    text = doc.read_text()
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    head, rest = text.split(start)
    doc.write_text(head + start + "\n" + "\n".join(lines) + "\n" + end + rest.split(end)[1])


def main() -> None:
    _commit()  # the code this run imports
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("speed", help="time to first token, decode step, KV memory and FLOPs, interleaved")
    s.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    s.add_argument("--rounds", type=int, default=3)
    s.add_argument("--steps", type=int, default=8, help="decode steps timed per round")
    s.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    s.add_argument("--device", default="cpu", help="cpu or cuda (writes docs/vlm/speed_cuda.json)")
    s.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    v = sub.add_parser("video", help="DyCoke on a Qwen2-VL-shaped model with a video, interleaved")
    v.add_argument("--rounds", type=int, default=3)
    v.add_argument("--steps", type=int, default=8, help="decode steps timed per round")
    v.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    v.add_argument("--device", default="cpu", help="cpu or cuda (writes docs/vlm/video_cuda.json)")
    v.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    sub.add_parser("report", help="docs/vlm.md's tables from docs/vlm/speed.json and video.json")
    args = p.parse_args()
    if args.cmd == "speed":
        run_speed(args.batch, args.rounds, args.steps, args.threads, device=args.device, dtype=args.dtype)
    elif args.cmd == "video":
        run_speed([1], args.rounds, args.steps, args.threads, video=True, device=args.device, dtype=args.dtype)
    else:
        for name in ("speed", "video", "speed_cuda", "video_cuda"):
            if (OUT / f"{name}.json").is_file():
                report(name)


if __name__ == "__main__":
    main()
