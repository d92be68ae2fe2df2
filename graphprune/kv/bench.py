"""Speed and fidelity of cache recipes on a decoder LLM (or a vision-language model) against its full cache.

Every variant (and the unmodified model) prefills the same prompts (with their images) and is then fed the same
continuation one token per step (teacher forcing), in rounds interleaved across variants.
Reported per variant: the prompt pass's time (time to first token) and decode latency per step with their speedups,
tokens/s, KV-cache memory against the full cache, and the fidelity of each step's next-token distribution to the
unmodified model's (cosine of logits, KL, top-1 agreement) plus the continuation perplexity.
"""

from __future__ import annotations

import statistics

import torch

from graphprune.bench import BenchResult, _progress, clock, fidelity
from graphprune.kv.model import cache_argument, positions, returned_cache


def continuation(model, ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor, inputs: dict | None = None):
    """Next-token logits for the prompt's end and each target (B, T, V), seconds of the prompt pass and per decode
    step, and the cache. ``inputs``: the prompt pass's other arguments (a vision-language model's images; it numbers
    positions itself)."""
    from graphprune.kv.model import MROPE
    from graphprune.kv.mrope import four_rows

    mrope = model.config.model_type in MROPE  # (positions as generate builds them: the model's own forward cannot
    # number a decoding step it was not given positions for)
    with torch.inference_mode():
        t0 = clock()
        if inputs:
            kwargs = {"input_ids": ids, "attention_mask": mask, **inputs}
            out = model(**(four_rows(model, kwargs, 0) if mrope else kwargs), use_cache=True)
        else:
            out = model(ids, attention_mask=mask, position_ids=positions(mask), use_cache=True)
        prefill = clock() - t0
        logits, cache, name = [out.logits[:, -1]], returned_cache(out), cache_argument(model)
        t0 = clock()
        for i in range(targets.shape[1] - 1):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            step = {"input_ids": targets[:, i:i + 1], "attention_mask": mask}
            if mrope:
                step = four_rows(model, step, cache.get_seq_length())
            elif not inputs:
                step["position_ids"] = positions(mask)[:, -1:]
            out = model(**step, use_cache=True, **{name: cache})
            logits.append(out.logits[:, -1])
            cache = returned_cache(out)
        step = (clock() - t0) / max(targets.shape[1] - 1, 1)
    return torch.stack(logits, 1).float(), prefill, step, cache


def _cache_bytes(cache) -> int:
    if hasattr(cache, "nbytes"):
        return cache.nbytes
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers if layer.keys is not None)


def perplexity(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).exp())


def bench_decoder(model, variants, ids: torch.Tensor, mask: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                  new_tokens: int = 32, rounds: int = 3, warmup: int = 1, progress: bool = True,
                  inputs: dict | None = None) -> list[BenchResult]:
    """``variants``: (recipe, options) pairs. ``targets``: the continuation to feed (default: the unmodified
    model's greedy continuation of ``new_tokens`` tokens). ``inputs``: the prompt pass's other arguments (pixel values
    and the like)."""
    import graphprune

    mask = torch.ones_like(ids) if mask is None else mask
    was_training = model.training
    model.eval()
    try:
        if targets is None:
            with torch.inference_mode():
                targets = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                                         **(inputs or {}))[:, ids.shape[1]:]
        models = {"full": model, **{f"{i}": graphprune.optimize(model, name, **opts) for i, (name, opts) in enumerate(variants)}}
        steps: dict[str, list[float]] = {k: [] for k in models}
        prefills: dict[str, list[float]] = {k: [] for k in models}
        last: dict[str, tuple] = {}
        names = list(models)
        with _progress(progress) as bar:
            task = bar.add_task("decoding", total=warmup + rounds) if bar is not None else None
            for r in range(warmup + rounds):
                for k in names[r % len(names):] + names[: r % len(names)]:
                    logits, prefill, step, cache = continuation(models[k], ids, mask, targets, inputs)
                    if r >= warmup:
                        steps[k].append(step)
                        prefills[k].append(prefill)
                    last[k] = (logits, _cache_bytes(cache))
                if task is not None:
                    bar.advance(task)
    finally:
        model.train(was_training)
    base_ms = statistics.median(steps["full"]) * 1e3
    base_prefill = statistics.median(prefills["full"]) * 1e3
    base_logits, base_bytes = last["full"]
    base_ppl = perplexity(base_logits, targets)
    results = []
    for i, (name, opts) in enumerate(variants):
        ms = statistics.median(steps[str(i)]) * 1e3
        logits, nbytes = last[str(i)]
        fid = fidelity(base_logits.flatten(0, 1), logits.flatten(0, 1), logits=True)
        ppl = perplexity(logits, targets)
        fid.update(perplexity=ppl, baseline_perplexity=base_ppl, perplexity_ratio=ppl / base_ppl,
                   cache_ratio=nbytes / base_bytes)
        batch = ids.shape[0]
        results.append(BenchResult(
            recipe=name, options=dict(opts), target="eager", batch=batch, baseline_ms=base_ms, latency_ms=ms,
            speedup=base_ms / ms, throughput=batch * 1e3 / ms, baseline_throughput=batch * 1e3 / base_ms,
            flop_ratio=float("nan"), tokens_per_block=[], fidelity=fid, peak_memory_mb=nbytes / 2**20,
            baseline_peak_memory_mb=base_bytes / 2**20, prefill_ms=statistics.median(prefills[str(i)]) * 1e3,
            baseline_prefill_ms=base_prefill))
    return results


COLUMNS = ("variant", "TTFT ms", "TTFT speedup", "ms/step", "speedup", "cache", "ppl ratio", "top-1", "KL")


def _row(r: BenchResult) -> list[str]:
    f = r.fidelity
    return [r.label, f"{r.prefill_ms:.1f}", f"{r.baseline_prefill_ms / r.prefill_ms:.2f}×", f"{r.latency_ms:.1f}",
            f"{r.speedup:.2f}×", f"{f['cache_ratio']:.3f}", f"{f['perplexity_ratio']:.4f}", f"{f['top1_agreement']:.3f}",
            f"{f['kl']:.4f}"]


def table(results, title: str = "graphprune bench (decoder)"):
    from rich.table import Table

    t = Table(title=title)
    for col in COLUMNS:
        t.add_column(col, justify="left" if col == "variant" else "right", no_wrap=True)
    for r in results:
        t.add_row(*_row(r))
    return t


def markdown(results, title: str = "graphprune bench (decoder)") -> str:
    lines = [f"### {title}", "", "| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 1)]
    lines += ["| " + " | ".join([f"`{c}`" if i == 0 else c for i, c in enumerate(_row(r))]) + " |" for r in results]
    if results:
        b = results[0]
        lines += ["", f"Full cache: {b.baseline_prefill_ms:.1f} ms to the first token, {b.baseline_ms:.1f} ms per decode "
                      f"step (batch {b.batch}), "
                      f"{b.baseline_peak_memory_mb:.2f} MB of KV cache, continuation perplexity "
                      f"{b.fidelity['baseline_perplexity']:.3f}."]
    return "\n".join(lines) + "\n"
