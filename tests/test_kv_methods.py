"""Cache methods beyond eviction at a fixed budget: RocketKV's two stages (sparse attention while decoding)."""

from __future__ import annotations

import pytest
import torch

import graphprune
from graphprune.kv import EvictingLayer
from graphprune.kv.policies.rocketkv import plan
from graphprune.recipes import get_recipe
from tests import reference_kv as ref
from tests.test_kv import greedy, kept, left_padded, prompts, tiny


# -- RocketKV ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("total,budget,expected", [  # (prompt + 128 new tokens, budget) → the authors' split
    (16384, 256, (1467, 128, 3, 61)), (16384, 1024, (4709, 512, 3, 81)), (32768, 4096, (14740, 2048, 2, 70)),
    (131072, 256, (1168, 128, 3, 75)), (300, 1024, (172, 512, 1, 128))])
def test_rocketkv_splits_the_budget_as_the_authors_code(total, budget, expected):
    p = plan(budget, total - 128, 128, 128)
    assert (p.keep, p.k, p.page, p.channels) == expected == ref.rocketkv_plan(budget, total - 128, 128, 128)


def _layer(rec, prompt: int, steps: int, kv_heads=2, q_heads=4, d=16, seed=0):
    """A cache layer fed a random prompt (stage 1), then ``steps`` decoding steps through its attention; the
    attention outputs of the steps and what went in."""
    g = torch.Generator().manual_seed(seed)
    n = prompt + steps
    keys, values = torch.randn(1, kv_heads, n, d, generator=g), torch.randn(1, kv_heads, n, d, generator=g)
    queries = 2 * torch.randn(1, q_heads, n, d, generator=g)
    layer = EvictingLayer(rec, 0, 1)
    layer.update(keys[:, :, :prompt], values[:, :, :prompt])
    layer.evict(layer.receive(queries[:, :, :prompt], 0.25, torch.ones(1, prompt, dtype=torch.bool),
                              torch.arange(prompt)[None]))
    after_prompt = kept(layer)
    outs = []
    for t in range(prompt, n):
        layer.update(keys[:, :, t:t + 1], values[:, :, t:t + 1])
        out, _ = layer.attend(None, queries[:, :, t:t + 1], None, 0.25, 0.0, {"position_ids": torch.tensor([[t]])})
        outs.append(out)
    return layer, after_prompt, outs, (keys, values, queries)


@pytest.mark.parametrize("budget", [16, 24])
def test_rocketkv_stage_one_keeps_the_pooled_snapkv_set(budget):
    """Stage 1: per KV head, the window and the best of the earlier keys by max-pooled window votes (the group's
    summed), as many as the plan leaves the prompt."""
    prompt, kernel, window = 48, 3, 4
    rec = get_recipe("rocketkv", budget=budget, window=window, kernel=kernel, new_tokens=8)
    layer, after, _, (keys, _, queries) = _layer(rec, prompt, 0)
    keep = ref.rocketkv_plan(budget, prompt, 8, 16)[0]
    assert keep < prompt and all(len(s) == keep for s in after)
    for h in range(2):
        logits = [queries[0, q] @ keys[0, h].T * 0.25 for q in (2 * h, 2 * h + 1)]
        expected, _ = ref.snapkv(logits, prompt, keep, window, kernel, "max")
        assert after[h] == expected


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rocketkv_stage_two_attends_exactly_to_the_approximate_top_k(seed):
    """Stage 2: each decoding step's output is exact attention over the slots the paper's approximate score picks
    (page bounds, top channels, SparQ's temperature, group mean); the cache keeps every slot."""
    prompt, steps, budget, g = 40, 8, 12, 4
    rec = get_recipe("rocketkv", budget=budget, window=4, kernel=3, new_tokens=steps)
    layer, after, outs, (keys, values, queries) = _layer(rec, prompt, steps, q_heads=2 * g, seed=seed)
    keep, k, page, channels = ref.rocketkv_plan(budget, prompt, steps, 16)
    assert page > 1 and channels < 16 and k < keep  # the hybrid score is exercised, not exact top-k
    slots = [sorted(s) for s in after]  # each head's cache, in order
    for i, t in enumerate(range(prompt, prompt + steps)):
        for h in range(2):
            cache = slots[h] + list(range(prompt, t + 1))
            qs = [queries[0, q, t] for q in range(g * h, g * h + g)]
            picked = ref.rocketkv_step([q.tolist() for q in qs], [keys[0, h, j].tolist() for j in cache], k, page,
                                       channels)
            sel = [cache[j] for j in sorted(picked)]
            for j, q in enumerate(qs):
                probs = torch.softmax(q @ keys[0, h, sel].T * 0.25, 0)
                torch.testing.assert_close(outs[i][0, 0, g * h + j], probs @ values[0, h, sel], atol=1e-5, rtol=0)
    assert all(len(s) == keep + steps for s in kept(layer))


def test_rocketkv_full_and_large_budgets_equal_the_model():
    """Budget 1.0 is the unmodified model; a budget whose half covers every slot keeps and reads them all."""
    model, ids = tiny(), prompts(2, 40)
    expected = greedy(model, ids, n=8)
    for options in ({"budget": 1.0}, {"budget": 2 * (40 + 8), "window": 4, "new_tokens": 8}):
        assert torch.equal(greedy(graphprune.optimize(model, "rocketkv", **options), ids, n=8), expected)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_rocketkv_batch_with_left_padding_equals_each_prompt_alone(family):
    """Each sequence is planned from its own prompt, and its pages are formed over its own tokens."""
    fast = graphprune.optimize(tiny(family), "rocketkv", budget=12, window=4, kernel=3, new_tokens=8)
    ids, mask, alone = left_padded()
    out = greedy(fast, ids, mask, n=10)
    for i, x in enumerate(alone):
        assert torch.equal(greedy(fast, x, n=10)[0], out[i])
    with torch.no_grad():
        cache = fast(ids, attention_mask=mask, use_cache=True).cache
    real = cache.layers[0].storage.valid[:, 0].sum(-1).tolist()
    assert real == [plan(12, 24, 8, 16).keep, plan(12, 17, 8, 16).keep] == [16, 12]
