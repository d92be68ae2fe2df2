"""KV-cache recipes on decoder LLMs: exactness at full budget, the papers' kept sets, GQA, padding, generate."""

from __future__ import annotations

import pytest
import torch
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

import graphprune
from graphprune.errors import RecipeError, ScheduleError, UnsupportedArchitectureError
from graphprune.kv import EvictingCache, EvictingLayer
from graphprune.recipes import RECIPES, get_recipe
from graphprune.ops.quant import dequantize, pack, quantize, unpack
from tests import reference_kv as ref

CACHE_RECIPES = ["streaming_llm", "h2o", "tova", "snapkv", "pyramidkv", "scissorhands"]
SMALL = {"streaming_llm": {"sinks": 2}, "snapkv": {"window": 4}, "pyramidkv": {"window": 4},
         "scissorhands": {"history": 6, "recent": 2},
         "fastgen": {"recovery": 0.8, "special_ids": [5], "punct_ids": [9, 11, 13]},
         "kvquant": {"calibration": [[(7 * i + 3) % 99 + 2 for i in range(32)]]}}


def tiny(family: str = "llama", seed: int = 0, kv_heads: int = 2, layers: int = 3):
    torch.manual_seed(seed)
    common = dict(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=kv_heads, max_position_embeddings=256, pad_token_id=0, eos_token_id=1)
    cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
           "qwen3": (Qwen3Config, Qwen3ForCausalLM), "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM),
           "mistral": (MistralConfig, MistralForCausalLM), "phi3": (Phi3Config, Phi3ForCausalLM)}[family]
    extra = {"head_dim": 16} if family in ("qwen3", "gemma3") else {}
    if family == "gemma3":  # sliding-window layers (8 tokens) around a global one, each kind with its own RoPE
        extra.update(sliding_window=8, layer_types=(["sliding_attention", "full_attention"] * layers)[:layers])
    if family == "mistral":  # one sliding window (8 tokens) for every layer
        extra["sliding_window"] = 8
    return cls[1](cls[0](**common, **extra)).eval()


def prompts(batch=2, length=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 101, (batch, length), generator=g)


def left_padded(seed=2):
    """Two prompts of 24 and 17 real tokens, left padded, plus each one alone."""
    ids = prompts(2, 24, seed)
    mask = torch.ones_like(ids)
    ids[1, :7], mask[1, :7] = 0, 0
    return ids, mask, [ids[:1], ids[1:, 7:]]


def greedy(model, ids, mask=None, n=8):
    out = model.generate(ids, attention_mask=mask if mask is not None else torch.ones_like(ids), max_new_tokens=n,
                         do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:]


# -- exactness at full budget ------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3", "mistral", "phi3"])
@pytest.mark.parametrize("recipe", [*CACHE_RECIPES, "kivi", "fastgen", "pyramidinfer", "lazyllm", "rocketkv", "gear", "palu", "qhitter", "kvquant"])
def test_full_budget_reproduces_logits_step_by_step(family, recipe):
    """Every policy at full budget equals the model, prompt and decoding steps (sliding windows too: Gemma 3's local
    layers, Mistral's window; Phi-3's fused q/k/v projection)."""
    model = tiny(family)
    fast = graphprune.optimize(model, recipe, **{**SMALL.get(recipe, {}), **RECIPES[recipe].zero})
    ids = prompts()
    with torch.no_grad():
        ref_out = model(ids, use_cache=True)
        out = fast(ids, use_cache=True)
        assert isinstance(out.cache, EvictingCache)
        torch.testing.assert_close(out.logits, ref_out.logits, atol=1e-5, rtol=0)
        ref_cache, cache = ref_out.cache, out.cache
        for step in range(5):
            nxt = ref_out.logits[:, -1:].argmax(-1)
            ref_out = model(nxt, past_key_values=ref_cache, use_cache=True)
            out = fast(nxt, past_key_values=cache, use_cache=True)
            torch.testing.assert_close(out.logits, ref_out.logits, atol=1e-5, rtol=0)
    from graphprune.kv.storage import Slots

    window = getattr(model.config, "sliding_window", None)
    for layer in cache.layers:  # a sliding layer holds its window less one, where its storage gives room back
        trims = layer.window is not None and type(layer.storage) is Slots and not fast.graphprune.policy.revives
        assert layer.length == (window - 1 if trims else 24 + 5)


def test_user_model_untouched():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = prompts()
    with torch.no_grad():
        expected = model(ids).logits
    fast = graphprune.optimize(model, "h2o", budget=8)
    with torch.no_grad():
        fast(ids)
    assert type(model) is LlamaForCausalLM and model.config._attn_implementation != "graphprune_kv"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, atol=0, rtol=0)
    assert fast.model.embed_tokens.weight is model.model.embed_tokens.weight  # weights shared, not copied


# -- the papers' kept sets on hand-made attention patterns ------------------------------------

def run_layer(recipe, keys, values, queries, prompt, layer_idx=0, n_layers=1, tokens=None, each=None):
    """One cache layer fed the prompt's keys, values and queries (scaling 1), then one token per step; ``each(layer,
    t)`` is called after every step (t tokens seen)."""
    layer = EvictingLayer(recipe, layer_idx, n_layers)

    def step(lo, hi, first):
        layer.update(keys[:, :, lo:hi], values[:, :, lo:hi])
        if tokens is not None:
            layer.call.input_ids = torch.tensor(tokens[lo:hi])[None]
        layer.evict(layer.receive(queries[:, :, lo:hi], 1.0, torch.ones(1, hi - lo, dtype=torch.bool),
                                  torch.arange(lo, hi)[None]))

    step(0, prompt, True)
    for i in range(prompt, keys.shape[2]):
        step(i, i + 1, False)
        if each is not None:
            each(layer, i + 1)
    return layer


def drive(recipe, logits, kv_heads, prompt, total, layer_idx=0, n_layers=1, tokens=None):
    """Run one cache layer on keys e_j and queries whose dot products are the given logits (Hq, T, T); the kept
    positions of each KV head."""
    t = logits.shape[1]
    keys = torch.eye(t).expand(1, kv_heads, t, t)[:, :, :total]
    layer = run_layer(recipe, keys, keys, logits[None], prompt, layer_idx, n_layers, tokens)
    st = layer.storage
    return [set(st.pos[0, h][st.valid[0, h]].tolist()) for h in range(kv_heads)]


def kept(layer) -> list[set[int]]:
    st = layer.storage
    return [set(st.pos[0, h][st.valid[0, h]].tolist()) for h in range(st.pos.shape[1])]


def patterns(hq=4, t=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(hq, t, t, generator=g)
    logits[:, :, 3] += 4.0  # a heavy hitter
    logits[0, :, 11] += 3.0  # one head's favourite
    return logits


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_h2o_keeps_the_papers_set(kv_heads):
    logits = patterns()
    rec = get_recipe("h2o", budget=8, recent=0.5)
    kept = drive(rec, logits, kv_heads, prompt=12, total=20)
    g = 4 // kv_heads
    for h in range(kv_heads):
        assert kept[h] == ref.h2o(list(logits[h * g:(h + 1) * g]), 12, 20, budget=8, recent=4)
    assert all(3 in k for k in kept)


@pytest.mark.parametrize("pooling,kernel", [("avg", 5), ("max", 7), ("avg", 1)])
def test_snapkv_keeps_the_papers_set(pooling, kernel):
    logits = patterns(t=20, seed=3)
    rec = get_recipe("snapkv", budget=10, window=4, kernel=kernel, pooling=pooling)
    kept = drive(rec, logits, 2, prompt=20, total=20)
    for h in range(2):
        expected, pooled = ref.snapkv(list(logits[2 * h:2 * h + 2]), 20, 10, 4, kernel, pooling)
        assert len(kept[h]) == 10 and set(range(16, 20)) <= kept[h]
        chosen, dropped = kept[h] - set(range(16, 20)), set(range(16)) - kept[h]
        assert min(pooled[k] for k in chosen) >= max(pooled[k] for k in dropped) - 1e-12  # a top set of the votes
        assert kept[h] == expected  # (max pooling ties often: the earlier slots win, as in the reference)
    assert kept[0] != kept[1] or pooling == "max"  # per KV head (here max pooling's plateaus pick the same set)


def test_snapkv_is_a_no_op_below_budget_and_grows_while_decoding():
    assert ref.snapkv([patterns()[0]], 12, 16, 4, 5, "avg")[0] == set(range(12))
    rec = get_recipe("snapkv", budget=16, window=4)
    assert drive(rec, patterns(), 2, prompt=12, total=20)[0] == set(range(20))


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_scissorhands_keeps_the_papers_set(kv_heads):
    logits = patterns(seed=11)
    kept = drive(get_recipe("scissorhands", budget=8, history=5, recent=2), logits, kv_heads, prompt=12, total=20)
    g = 4 // kv_heads
    for h in range(kv_heads):
        assert kept[h] == ref.scissorhands(list(logits[h * g:(h + 1) * g]), 12, 20, budget=8, history=5, recent=2)


@pytest.mark.parametrize("recovery,expected", [(1.0, [4, 4]), (0.9, [2, 3]), (0.5, [1, 2]), (0.3, [0, 1])])
def test_fastgen_profiles_and_keeps_the_papers_set(recovery, expected):
    logits = patterns(seed=13)
    logits[0:2, :, 0] += 5.0  # KV head 0 looks at the special token 0
    idx = torch.arange(20)
    logits[2:4] += 6.0 * ((idx[:, None] - idx[None, :]).abs() <= 2)  # KV head 1 looks nearby
    tokens = [5, 40, 41, 9, 42, 43, 44, 9, 45, 46, 47, 48, 9, 49, 50, 51, 52, 9, 53, 54]  # 5: special, 9: punctuation
    rec = get_recipe("fastgen", recovery=recovery, local=0.3, frequent=0.2, special_ids=[5], punct_ids=[9])
    layer_kept = drive(rec, logits, 2, prompt=12, total=20, tokens=tokens)
    for h in range(2):
        policy, kept = ref.fastgen(list(logits[2 * h:2 * h + 2]), tokens, 12, 20, recovery, 0.3, 0.2, {5}, {9})
        assert layer_kept[h] == kept and policy == expected[h], f"head {h}, policy {policy}"
    # the special-token head needs less than the local head; lower T, cheaper policies


@pytest.mark.parametrize("layer", [0, 2, 3])
def test_pyramidinfer_selects_the_papers_prompt_tokens(layer):
    logits = patterns(t=20, seed=17)
    rec = get_recipe("pyramidinfer", recent=0.2, decay=0.5, distance_weight=1.2, sinks=2, min_context=3)
    keys = torch.eye(20).expand(1, 2, 20, 20)
    lay = run_layer(rec, keys, keys, logits[None], 20, layer, 4)
    expected = ref.pyramidinfer_prompt(list(logits), 20, layer, 4, 0.2, 0.5, 1.2, 2, 3)
    stop = rec.rows(lay.view(logits[None], 1.0, True, torch.arange(20)[None], torch.ones(1, 20, dtype=torch.bool)))
    assert (None if stop is None else set((~stop[0]).nonzero().flatten().tolist())) == expected
    assert (expected is None) == (layer == 0)  # layer 0 keeps everything (r = 1)


def test_pyramidinfer_prunes_the_prompt_with_depth_and_compresses_decoded_blocks():
    model = tiny(layers=4)
    ids, mask, _ = left_padded()
    fast = graphprune.optimize(model, "pyramidinfer", decay=0.5, min_context=4, block=4)
    with torch.no_grad():
        out = fast(ids, attention_mask=mask, use_cache=True)
        slots = out.cache.slots()
        assert slots[0] == slots[1] == 24 and slots[1] > slots[2] > slots[3]  # layer 0 keeps r = 1
        assert out.logits.shape[1] < 24  # the top layer saw fewer tokens; the last one is among them
        expected = model(ids, attention_mask=mask).logits[:, -1]
        assert (out.logits[:, -1] - expected).abs().max() < 0.5
        third = out.cache.layers[3].storage
        assert third.valid[1, 0].all()  # the padding went first
        for _ in range(8):
            out = fast(out.logits[:, -1:].argmax(-1), cache=out.cache, use_cache=True)
        grown = out.cache.slots()
    keep = [max(int(4 * 0.9 * rec), 1) for rec in
            [RECIPES["pyramidinfer"].schedule(i, 4, 0.1) for i in range(4)]]
    assert grown == [s + 8 - 2 * (4 - k) for s, k in zip(slots, keep)]  # two full blocks of 4 compressed per layer


def test_pyramidinfer_layers_decode_over_exactly_the_tokens_they_keep():
    """Layers compress decoded blocks on their own: every decoding step equals a by-hand forward in which each layer
    attends over the tokens its own cache holds (a token a lower layer evicted stays visible where it is cached)."""
    model = tiny(layers=4)
    fast = graphprune.optimize(model, "pyramidinfer", decay=0.5, min_context=4, block=4)
    ids = prompts(1, 24)
    hand = ref.LazyLLM(model, lambda layer: 0.0, revive=False)  # rate 0: no rows stop
    with torch.no_grad():
        out = fast(ids, use_cache=True)
        differ = 0
        for step in range(12):
            token = int(out.logits[0, -1].argmax())
            for layer, lay in zip(hand.kv, out.cache.layers):
                st = lay.storage
                real = st.valid[0, 0]
                layer.clear()
                layer.update({int(p): (k, v) for p, k, v in
                              zip(st.pos[0, 0][real], st.keys[0].transpose(0, 1)[real], st.values[0].transpose(0, 1)[real])})
            held = [set(layer) for layer in hand.kv]
            differ += any(not held[i] <= held[0] for i in range(1, 4))
            expected = hand.forward([token], 24 + step)
            out = fast(torch.tensor([[token]]), cache=out.cache, use_cache=True)
            assert (out.logits[0, -1] - expected).abs().max() < 1e-4, f"step {step}"
    assert differ  # some layer held a token that layer 0 had evicted


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_lazyllm_equals_the_papers_definition(kv_heads):
    """Prompt and decoding steps against a by-hand LazyLLM (tests/reference_kv.py): the logits of every forward,
    the tokens each layer holds keys and values for, and the Aux Cache, with tokens reviving along the way."""
    model = tiny(layers=4, kv_heads=kv_heads)
    fast = graphprune.optimize(model, "lazyllm", rate=0.3, start=0)
    ids = prompts(1, 20)
    with torch.no_grad():
        lazy = ref.LazyLLM(model, lambda l: fast.graphprune.policy.rate_at(l, 4))
        tokens, expected = lazy.generate(ids[0].tolist(), 6)
        out = fast(ids, use_cache=True)
        assert out.logits.shape[1] < 20  # pruned prompt tokens do not reach the top
        got, cache = [out.logits[0, -1]], out.cache
        for t in tokens:
            out = fast(torch.tensor([[t]]), cache=cache, use_cache=True)
            assert out.logits.shape == (1, 1, 101)
            got.append(out.logits[0, -1])
    assert lazy.revived > 0 and lazy.pruned[0][0]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for l, layer in enumerate(cache.layers):
        st = layer.storage
        assert sorted(st.pos[0, 0][st.valid[0, 0]].tolist()) == sorted(lazy.kv[l])
        stored = (layer.aux.pos if layer.aux is not None else torch.empty(1, 0))[0]
        assert sorted(stored[stored >= 0].tolist()) == sorted(lazy.aux[l])
    assert cache.get_seq_length() == 26


def test_lazyllm_prunes_more_with_depth_and_reports_memory():
    model = tiny(layers=4)
    fast = graphprune.optimize(model, "lazyllm", rate=0.25, start=1)
    with torch.no_grad():
        out = fast(prompts(1, 40), use_cache=True)
    # layer 0 and 1 compute all 40 tokens; then 40 - 10 = 30, then 30 - 7 = 23
    assert out.cache.slots() == [40, 40, 30, 23]
    mem = out.cache.memory()
    assert mem["bytes"] > 0 and mem["ratio"] < 1  # the Aux Cache is counted, and still less than the full cache
    assert [fast.graphprune.policy.rate_at(i, 4) for i in range(4)] == [0, 0.25, 0.25, 0]


LONG = {  # recipes that evict at every step, and their direct references (tests/reference_kv.py)
    "h2o": ({"recent": 0.5}, lambda heads, p, t, b: ref.h2o(heads, p, t, budget=b, recent=b // 2)),
    "tova": ({}, None),
    "scissorhands": ({"history": 8, "recent": 3}, lambda heads, p, t, b: ref.scissorhands(heads, p, t, b, 8, 3)),
    "streaming_llm": ({"sinks": 3}, None),
}


@pytest.mark.parametrize("recipe", list(LONG))
def test_kept_sets_equal_the_reference_at_every_step_of_a_long_generation(recipe):
    """Ring-mode eviction over 130 decoding steps (the freed slot refilled each step, in place): after every step the
    kept set of each KV head equals the paper's, recomputed from scratch."""
    options, reference = LONG[recipe]
    logits = patterns(t=150, seed=21)
    logits[:, :, 60:67] += 2.5  # a needle the queries keep coming back to
    rec = get_recipe(recipe, budget=12, **options)
    t = logits.shape[1]
    keys = torch.eye(t).expand(1, 2, t, t)
    checked = []

    def each(layer, seen):
        if seen % 13 and seen != t:  # every 13th step and the last (the reference reruns from the start)
            return
        got = kept(layer)
        for h in range(2):
            heads = list(logits[2 * h:2 * h + 2])
            if recipe == "tova":
                expected = ref.tova(list(logits), 20, seen, 12)
            elif recipe == "streaming_llm":
                expected = ref.streaming_llm(20, seen, 12, 3)
            else:
                expected = reference(heads, 20, seen, 12)
            assert got[h] == expected, f"{recipe}: head {h} after {seen} tokens"
        checked.append(seen)

    run_layer(rec, keys, keys, logits[None], 20, each=each)
    assert len(checked) == 11


def test_tova_keeps_the_papers_set():
    logits = patterns(seed=5)
    kept = drive(get_recipe("tova", budget=7), logits, 2, prompt=10, total=20)
    assert kept[0] == kept[1] == ref.tova(list(logits), 10, 20, budget=7)


def test_streaming_llm_keeps_sinks_and_recent():
    kept = drive(get_recipe("streaming_llm", budget=8, sinks=3), patterns(), 2, prompt=12, total=20)
    assert kept[0] == kept[1] == ref.streaming_llm(12, 20, 8, 3) == {0, 1, 2, 15, 16, 17, 18, 19}


def test_pyramidkv_budgets_fall_with_depth_and_keep_the_mean():
    rec = get_recipe("pyramidkv", budget=40, window=8, beta=20)
    caps = [rec.capacity(i, 6, 200) for i in range(6)]
    assert caps == ref.pyramidkv_budgets(40, 8, 20, 6, 200)
    assert caps == sorted(caps, reverse=True) and caps[0] > caps[-1]
    # the authors' step (high - low) // layers: the top layer keeps a step more than (budget - window) // beta, and the
    # mean lies above the budget (here 46 of 40: the spread 62 over 6 layers rounds to steps of 10)
    assert caps == [71, 61, 51, 41, 31, 21] and sum(caps) / 6 == 46
    assert [rec.capacity(i, 6, 30) for i in range(6)] == [40] * 6  # short prompt: nothing to compress
    # the authors' PyramidKVCluster: a prompt shorter than 2 (budget - window) is compressed by uniform SnapKV
    rec = get_recipe("pyramidkv", budget=330, window=64)
    assert {rec.capacity(i, 30, 512) for i in range(30)} == {330}
    assert [rec.capacity(i, 30, 532) for i in (0, 29)] == [532, 155]  # from 2 (budget - window) on: the pyramid
    rec = get_recipe("pyramidkv", budget=128, window=32, beta=4)
    caps = [rec.capacity(i, 30, 2048) for i in range(30)]
    assert caps == list(range(200, 83, -4)) and sum(caps) / 30 == 142  # the step 144 // 30 = 4 rounds down
    rec = get_recipe("pyramidkv", budget=12, window=4)
    caps = [rec.capacity(i, 6, 24) for i in range(6)]
    assert caps == [20, 18, 16, 14, 12, 10]
    logits = patterns(t=24, seed=7)
    for layer in (0, 5):  # each layer is SnapKV at its own budget
        kept = drive(rec, logits, 2, prompt=24, total=24, layer_idx=layer, n_layers=6)
        for h in range(2):
            assert kept[h] == ref.snapkv(list(logits[2 * h:2 * h + 2]), 24, caps[layer], 4, 7, "max")[0]


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("prompt,total", [(13, 13), (13, 30), (5, 21)])
def test_kivi_stores_the_papers_quantised_cache(bits, prompt, total):
    g = torch.Generator().manual_seed(bits)
    keys, values = torch.randn(1, 2, total, 8, generator=g), torch.randn(1, 2, total, 8, generator=g)
    rec = get_recipe("kivi", bits=bits, group=4, residual=8)
    layer = run_layer(rec, keys, values, torch.zeros(1, 2, total, 8), prompt).storage
    k, v = layer.kv()
    for h in range(2):
        rk, rv, nk, nv = ref.kivi(keys[0, h], values[0, h], prompt, bits, 4, 8)
        assert (layer.nk, layer.nv) == (nk, nv)
        torch.testing.assert_close(k[0, h].double(), rk, atol=1e-5, rtol=0)
        torch.testing.assert_close(v[0, h].double(), rv, atol=1e-5, rtol=0)
    full = 2 * total * 2 * 8 * 4
    assert layer.nbytes < full and layer.length == total


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantisation_packs_and_bounds_the_error(bits):
    codes = torch.randint(0, 2**bits, (3, 5, 16), dtype=torch.uint8)
    assert torch.equal(unpack(pack(codes, bits), bits), codes) and pack(codes, bits).shape[-1] == 16 * bits // 8
    x = torch.randn(4, 6, 16)
    packed, scale, lo = quantize(x, bits, axis=1)
    assert scale.shape == (4, 1, 16)
    assert ((dequantize(packed, scale, lo, bits) - x).abs() <= scale / 2 + 1e-6).all()


def test_kivi_memory_and_padding():
    model = tiny(kv_heads=2)
    ids, mask, _ = left_padded()
    fast = graphprune.optimize(model, "kivi", bits=2, group=4, residual=8)
    with torch.no_grad():
        out = fast(ids, attention_mask=mask, use_cache=True)
    k = out.cache.layers[0].storage.kv()[0]
    raw = graphprune.optimize(model, "kivi", residual=2**30)  # never quantises: the raw keys
    with torch.no_grad():
        rk = raw(ids, attention_mask=mask, use_cache=True).cache.layers[0].storage.kv()[0]
    # sample 1 is padded on slots 0-6: the group of slots 4-7 holds one real token, which therefore quantises
    # exactly (padding takes no part in the min/max); slots 8-11 are a group of real tokens
    torch.testing.assert_close(k[1, :, 7], rk[1, :, 7], atol=1e-6, rtol=0)
    for h in range(2):
        for c in range(16):
            expected = ref.minmax_quant(rk[1, h, 8:12, c].double().tolist(), 2)
            torch.testing.assert_close(k[1, h, 8:12, c].double(), torch.tensor(expected, dtype=torch.double), atol=1e-5, rtol=0)
    long = graphprune.optimize(tiny(), "kivi", bits=2, residual=32)
    with torch.no_grad():
        mem = long(prompts(1, 250), use_cache=True).cache.memory()
    # head_dim 16: 2-bit codes plus fp32 scales come to 0.1875 of fp32 (0.125 at head_dim 64)
    assert mem["ratio"] <= (224 * 0.1875 + 26) / 250 + 1e-6
    with pytest.raises(ScheduleError, match="multiple of group"):
        get_recipe("kivi", group=32, residual=48)
    with pytest.raises(ScheduleError, match="leave budget at 1.0"):
        get_recipe("kivi", budget=0.5)


# -- models: GQA storage, padding, generate ---------------------------------------------------

@pytest.mark.parametrize("recipe", CACHE_RECIPES)
def test_cache_is_stored_at_kv_heads_and_within_budget(recipe):
    model = tiny(kv_heads=2)
    fast = graphprune.optimize(model, recipe, budget=12, **SMALL.get(recipe, {}))
    ids = prompts(2, 30)
    with torch.no_grad():
        out = fast(ids, use_cache=True)
        for _ in range(3):
            out = fast(out.logits[:, -1:].argmax(-1), past_key_values=out.cache, use_cache=True)
    layer = out.cache.layers[0]
    assert layer.keys.shape[:2] == (2, 2) and layer.keys.shape[-1] == 16
    mem = out.cache.memory()
    # SnapKV/PyramidKV compress the prompt once, then the cache grows; recipes that evict at every step hold one
    # free slot the next token is written into (in place)
    grows = 3 if recipe in ("snapkv", "pyramidkv") else 1
    caps = [layer.capacity for layer in out.cache.layers]
    assert out.cache.slots() == [c + grows for c in caps]
    assert all(int(layer.storage.valid[b, h].sum()) == layer.capacity + grows - (grows == 1)
               for layer in out.cache.layers for b in range(2) for h in range(2))
    assert caps == (ref.pyramidkv_budgets(12, 4, 20, 3, 30) if recipe == "pyramidkv" else [12] * 3)
    assert mem["ratio"] == pytest.approx((sum(caps) / 3 + grows) / 33, abs=0.02)
    assert out.cache.get_seq_length() == 33


def test_decoding_appends_in_place_and_keeps_the_full_caches_keys():
    """A growing cache writes each decoded token into spare slots (1/32 of its length at a time), not a new copy of
    the cache per token as concatenating does, and holds exactly the keys of the unmodified model's cache."""
    from graphprune.kv.storage import GROW

    model = tiny(layers=2)
    fast = graphprune.optimize(model, "snapkv", budget=1.0, window=4)
    ids, steps = prompts(2, 160), 48
    with torch.no_grad():
        out, want = fast(ids, use_cache=True), model(ids, use_cache=True)
        buffers = set()
        for _ in range(steps):
            nxt = out.logits[:, -1:].argmax(-1)
            out = fast(nxt, past_key_values=out.cache, use_cache=True)
            want = model(nxt, past_key_values=want.past_key_values, use_cache=True)
            buffers.add(out.cache.layers[0].keys.untyped_storage().data_ptr())
    for layer, full in zip(out.cache.layers, want.past_key_values.layers):  # (above layer 0: SDPA's rounding)
        assert torch.allclose(layer.keys, full.keys, atol=1e-5) and torch.allclose(layer.values, full.values, atol=1e-5)
    assert torch.equal(out.cache.layers[0].keys, want.past_key_values.layers[0].keys)
    assert len(buffers) <= steps // (160 // GROW) + 1  # one new buffer per GROW-th of the length, not per token
    held = out.cache.memory()["ratio"]
    assert 1.0 <= held <= 1.0 + 1 / GROW + 1e-6  # the spare slots are counted, and stay within 1/GROW


VIEWS = {"view", "_unsafe_view", "slice", "narrow", "unsqueeze", "squeeze", "expand", "alias", "permute", "select",
         "transpose", "t", "reshape", "as_strided", "detach", "split", "unbind", "_local_scalar_dense"}


@pytest.mark.parametrize("recipe", [*CACHE_RECIPES, "kivi", "fastgen", "pyramidinfer", "lazyllm", "rocketkv", "gear", "palu", "qhitter", "kvquant"])
def test_a_cache_filled_under_inference_mode_goes_on_outside_it(recipe):
    """A prompt run under ``torch.inference_mode`` and decoding steps under ``no_grad`` (or the other way round), the
    cache read in between: the same logits as in one mode."""
    model = tiny()
    fast = graphprune.optimize(model, recipe, **SMALL.get(recipe, {}), **({"budget": 40} if recipe in CACHE_RECIPES else {}))
    ids = prompts(1, 64)  # (caches over 32 slots grow in place)

    def run(first, then):
        with first():
            out = fast(ids, use_cache=True)
        logits = []
        for step in range(8):
            with first() if step % 3 == 2 else then():
                out = fast(out.logits[:, -1:].argmax(-1), cache=out.cache, use_cache=True)
            logits.append(out.logits[:, -1].clone())
            for layer in out.cache.layers:  # reading settles the noted slot descriptions
                assert layer.storage.pos.shape == layer.storage.valid.shape
        return torch.stack(logits)

    same = run(torch.no_grad, torch.no_grad)
    assert torch.equal(run(torch.inference_mode, torch.no_grad), same)
    assert torch.equal(run(torch.no_grad, torch.inference_mode), same)


def _kernels_per_step(model, cache, token, steps=8) -> int:
    """The fewest tensor ops (views left out) one decode step dispatches, over ``steps`` steps."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in VIEWS:
                self.n += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for _ in range(steps):
        with Count() as c:
            out = model(token, past_key_values=cache, use_cache=True)
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        counts.append(c.n)
    return min(counts)


@pytest.mark.parametrize("recipe,options", [("snapkv", {"budget": 1.0, "window": 4}), ("snapkv", {"budget": 48, "window": 4}),
                                            ("pyramidkv", {"budget": 96, "window": 4})])
def test_decode_steps_dispatch_no_more_ops_than_the_unmodified_model(recipe, options):
    """Decoding past the prompt, a policy that evicts only the prompt (or nothing) adds no tensor op to the step: the
    cache appends in place where the unmodified model concatenates, and the slots' bookkeeping waits (on a GPU, each
    op is a kernel launch). (Every layer here keeps at least 32 slots: a shorter cache has no spare slot and grows
    by a copy per step, as concatenating does.)"""
    from transformers import DynamicCache

    model = tiny(layers=4)
    ids, token = prompts(1, 160), torch.tensor([[7]])
    with torch.inference_mode():
        base = _kernels_per_step(model, model(ids, past_key_values=DynamicCache(), use_cache=True).past_key_values, token)
        fast = graphprune.optimize(model, recipe, **options)
        ours = _kernels_per_step(fast, fast(ids, use_cache=True).cache, token)
    assert ours <= base


@pytest.mark.parametrize("recipe", [*CACHE_RECIPES, "fastgen", "lazyllm"])
def test_left_padded_batch_equals_each_prompt_alone(recipe):
    model = tiny("qwen2", seed=3)
    # PyramidKV's layer budgets depend on the prompt length once the bottom layer would keep it all: budget 8 stays clear
    budget = {"rate": 0.3, "start": 0} if recipe == "lazyllm" else {} if recipe == "fastgen" else {"budget": 8}
    fast = graphprune.optimize(model, recipe, **budget, **SMALL.get(recipe, {}))
    ids, mask, alone = left_padded()
    with torch.no_grad():
        batched = greedy(fast, ids, mask)
        for i, p in enumerate(alone):
            assert torch.equal(batched[i], greedy(fast, p)[0]), f"sample {i}"


def test_eviction_changes_the_output_and_full_budget_does_not():
    model = tiny()
    ids, mask, _ = left_padded()
    with torch.no_grad():
        expected = greedy(model, ids, mask, n=12)
        assert torch.equal(greedy(graphprune.optimize(model, "h2o", budget=1.0), ids, mask, n=12), expected)
        fast = graphprune.optimize(model, "streaming_llm", budget=6, sinks=2)
        logits = fast(ids, attention_mask=mask).logits
    assert torch.allclose(logits, model(ids, attention_mask=mask).logits, atol=1e-5)  # the prompt pass is exact
    with torch.no_grad():
        assert not torch.equal(greedy(fast, ids, mask, n=12), expected)


def test_sampling_generate_and_report():
    fast = graphprune.optimize(tiny(), "snapkv", budget=0.5, window=4)
    torch.manual_seed(0)
    out = fast.generate(prompts(), max_new_tokens=6, do_sample=True, top_k=20, pad_token_id=0,
                        return_dict_in_generate=True)
    assert out.sequences.shape == (2, 30)
    assert out.cache.slots() == [12 + 5] * 3  # half the 24-token prompt, then one slot per generated token
    assert fast.report.kv_heads == 2 and fast.report.recipe == "snapkv"


def test_streaming_rerotation_uses_positions_inside_the_cache():
    model = tiny(layers=1)  # one layer: cached keys depend on the token and its position only
    ids = prompts(1, 20)
    with torch.no_grad():
        faithful = graphprune.optimize(model, "streaming_llm", budget=8, sinks=2)
        plain = graphprune.optimize(model, "streaming_llm", budget=8, sinks=2, rerotate=False)
        a, b = faithful(ids), plain(ids)
        nxt = ids[:, -1:]
        la = faithful(nxt, past_key_values=a.cache).logits
        lb = plain(nxt, past_key_values=b.cache).logits
        # the faithful model sees the 8 cached tokens at positions 0..7 and the new one at 8: the same as
        # running the unmodified model on those 9 tokens from scratch
        kept = torch.cat([ids[:, :2], ids[:, -6:], nxt], dim=1)
        expected = model(kept).logits[:, -1:]
    torch.testing.assert_close(la, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(lb, expected, atol=1e-3)


# -- errors ------------------------------------------------------------------------------------

def test_errors_are_clear():
    with pytest.raises(ScheduleError, match="at least 5"):
        get_recipe("streaming_llm", budget=3)
    with pytest.raises(ScheduleError, match=r"\(0, 1\)"):
        get_recipe("h2o", budget=1.5)
    with pytest.raises(ScheduleError, match="rate must lie"):
        get_recipe("lazyllm", rate=1.0)
    with pytest.raises(ScheduleError, match="leave budget at 1.0"):
        get_recipe("lazyllm", budget=0.5)
    with pytest.raises(RecipeError, match="decoder LLMs take a KV-cache recipe"):
        graphprune.optimize(tiny(), "tome")
    with pytest.raises(RecipeError, match="KV-cache recipe"):
        graphprune.optimize(torch.nn.Linear(2, 2), "h2o")
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50)).eval()
    with pytest.raises(UnsupportedArchitectureError, match="llama, mistral, qwen2, qwen3"):
        graphprune.optimize(gpt2, "h2o", budget=8)
    partial = Phi3ForCausalLM(Phi3Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, partial_rotary_factor=0.75, pad_token_id=0,
                                         eos_token_id=1, bos_token_id=1))
    with pytest.raises(UnsupportedArchitectureError, match="rotates only part of each head"):
        graphprune.optimize(partial, "h2o", budget=8)
    fast = graphprune.optimize(tiny(), "h2o", budget=8)
    from transformers import DynamicCache
    full = tiny()(prompts(), use_cache=True).cache
    with pytest.raises(ValueError, match="pass the cache it returned"):
        fast(prompts()[:, -1:], past_key_values=full)
    assert isinstance(DynamicCache(), DynamicCache)
