"""Cache methods beyond eviction at a fixed budget: RocketKV (sparse attention while decoding), GEAR (compressed chunks)."""

from __future__ import annotations

import pytest
import torch

import graphprune
from graphprune.kv import EvictingLayer
from graphprune.kv.policies.rocketkv import plan
from graphprune.recipes import get_recipe
from tests import reference_kv as ref
from tests.test_kv import greedy, kept, left_padded, prompts, run_layer, tiny


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


# -- GEAR --------------------------------------------------------------------------------------------

def _gear_layer(rec, prompt: int, total: int, heads=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(1, heads, total, d, generator=g), torch.randn(1, heads, total, d, generator=g)
    keys[0, 0, 3, 1] = 9.0  # an outlier
    return run_layer(rec, keys, values, torch.zeros(1, heads, total, d), prompt).storage, keys, values


@pytest.mark.parametrize("bits,share", [(2, 0.25), (4, 0.25), (2, 0.0)])
def test_gear_stores_the_papers_decomposition_chunk_by_chunk(bits, share):
    """The prompt is compressed once at prompt_rank (a whole number of buffers), then every full buffer as its own
    chunk at rank; each chunk equals a by-hand GEAR (outliers kept exactly, KIVI groups, power-iteration low rank)."""
    prompt, total, group, buffer = 13, 30, 4, 4
    rec = get_recipe("gear", bits=bits, group=group, buffer=buffer, outliers=share, rank=1, prompt_rank=3,
                     iterations=3, seed=5)
    st, keys, values = _gear_layer(rec, prompt, total)
    assert st.nk == st.nv == 28 and len(st.kq) == 1 + 4 and st.length == total  # 12 from the prompt, then 4 × 4
    k, v = st.kv()
    spans = [(0, 12, 3)] + [(s, s + 4, 1) for s in range(12, 28, 4)]
    for lo, hi, rank in spans:
        start = torch.rand(8, rank, generator=torch.Generator().manual_seed(5))
        for x, got, is_key in ((keys, k, True), (values, v, False)):
            expected = ref.gear(x[0, :, lo:hi], is_key, bits, group, share, 3, start)
            torch.testing.assert_close(got[0, :, lo:hi].double(), expected, atol=2e-4, rtol=0)
    torch.testing.assert_close(k[0, :, 28:], keys[0, :, 28:])  # the buffer: full precision
    if share:  # the outlier comes back exactly, before the low-rank part is added (which is small there)
        assert abs(float(k[0, 0, 3, 1]) - 9.0) < 0.05


def test_gear_counts_its_memory_and_improves_on_plain_quantisation():
    rec = get_recipe("gear", bits=2, group=4, buffer=8, outliers=0.1, rank=2, prompt_rank=2)
    st, keys, values = _gear_layer(rec, 64, 64, d=16)
    k, _ = st.kv()
    plain = get_recipe("gear", bits=2, group=4, buffer=8, outliers=0.0, rank=0, prompt_rank=0)
    pk, _ = _gear_layer(plain, 64, 64, d=16)[0].kv()
    assert (k - keys).norm() < 0.8 * (pk - keys).norm()
    # held: 2-bit codes, a scale and minimum per group, outliers (value + int16 index), Q and P factors, all fp32
    n, d, h = 64, 16, 2
    codes = 2 * n * d * h * 2 // 8
    groups = 4 * (n * d * h // 4) * 2 * 2
    outl = (int(0.1 * n / 2) * 2 * d * h + int(0.1 * d * h / 2) * 2 * n) * (4 + 2)
    factors = 2 * h * (n + d) * 2 * 4
    assert st.nbytes == codes + groups + outl + factors


def test_gear_zero_and_batches():
    """A buffer that never fills is the unmodified model; a left-padded batch compresses each sequence alone where
    the padding fills whole groups (padding takes no part in the statistics)."""
    model, ids = tiny(), prompts(2, 40)
    assert torch.equal(greedy(graphprune.optimize(model, "gear", buffer=2**30), ids, n=6), greedy(model, ids, n=6))
    fast = graphprune.optimize(model, "gear", group=4, buffer=8, bits=4, outliers=0.25)
    ids = prompts(2, 24, seed=3)
    mask = torch.ones_like(ids)
    ids[1, :8], mask[1, :8] = 0, 0
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        both = fast(ids, attention_mask=mask, position_ids=pos, use_cache=True).cache.layers[1].storage.kv()
        alone = fast(ids[1:, 8:], use_cache=True).cache.layers[1].storage.kv()
    for got, expected in zip(both, alone):
        torch.testing.assert_close(got[1, :, 8:], expected[0], atol=1e-5, rtol=0)


# -- Palu --------------------------------------------------------------------------------------------

def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n**0.5


def _palu_reference(x, weight, bias, group_rows: int, rank: int, bits: int, gram=None):
    """Palu from the projection's input ``x`` (B, n, C): per group of rows, plain SVD W = U Σ Vᵀ, latent h = x A with
    A = V Σ^½ (rotated by a Hadamard matrix M when quantised: h M, then per token asymmetric with an integer zero point,
    back), output h B + b with B = Σ^½ Uᵀ. Returns (B, n, rows). With ``gram`` (Σ xᵀx of the calibration inputs, as
    SVD-LLM accumulates it), Palu's whitening: S = cholesky(gram), W S = U Σ Vᵀ, A = S⁻ᵀ V Σ^½."""
    outs = []
    for g in range(weight.shape[0] // group_rows):
        w = weight[g * group_rows:(g + 1) * group_rows].double()
        if gram is None:
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            a = vh[:rank].T * s[:rank].sqrt()
        else:
            root = torch.linalg.cholesky(gram.double())
            u, s, vh = torch.linalg.svd(w @ root, full_matrices=False)
            a = torch.linalg.solve_triangular(root.T, vh[:rank].T * s[:rank].sqrt(), upper=True)
        b = s[:rank].sqrt()[:, None] * u[:, :rank].T
        h = x.double() @ a
        if bits < 16:
            m = _sylvester(rank)
            h = h @ m
            levels = 2**bits - 1
            for i in range(h.shape[0]):
                for t in range(h.shape[1]):
                    row = h[i, t]
                    scale = max(float(row.max() - row.min()), 1e-5) / levels
                    zero = min(max(round(-float(row.min()) / scale), 0), levels)
                    h[i, t] = torch.tensor([(min(max(round(float(v) / scale) + zero, 0), levels) - zero) * scale
                                            for v in row], dtype=torch.double)
            h = h @ m.T
        out = h @ b
        if bias is not None:
            out = out + bias[g * group_rows:(g + 1) * group_rows].double()
        outs.append(out)
    return torch.cat(outs, -1)


@pytest.mark.parametrize("family,bits,group", [("llama", 16, 2), ("qwen2", 16, 1), ("qwen2", 3, 2), ("llama", 4, 4)])
def test_palu_caches_the_latent_and_attention_reads_its_reconstruction(family, bits, group):
    """The keys and values attention reads are Palu's low-rank reconstruction from each layer's input (RoPE on the
    rebuilt keys; Qwen2's bias on the reconstruction side), quantised where asked; memory holds the latents."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = tiny(family, kv_heads=4)
    fast = graphprune.optimize(model, "palu", ratio=0.5, align=8, bits=bits, group=group)
    ids = prompts(2, 16)
    inputs = {}
    attn = model.model.layers[1].self_attn
    hook = attn.k_proj.register_forward_hook(lambda m, a, out: inputs.setdefault("x", a[0]))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        hook.remove()
    with torch.no_grad():
        cache = fast(ids, use_cache=True).cache
        keys, values = cache.layers[1].storage.kv()
        rows = group * 16
        rank = rows // 2  # ratio 0.5, a multiple of align
        k = _palu_reference(inputs["x"], attn.k_proj.weight, attn.k_proj.bias, rows, rank, bits)
        v = _palu_reference(inputs["x"], attn.v_proj.weight, attn.v_proj.bias, rows, rank, bits)
        k, v = (t.reshape(2, 16, 4, 16).transpose(1, 2) for t in (k, v))
        cos, sin = model.model.rotary_emb(k.float(), torch.arange(16)[None].expand(2, -1))
        k, _ = apply_rotary_pos_emb(k.float(), k.float(), cos, sin)
    torch.testing.assert_close(keys.double(), k.double(), atol=1e-4, rtol=0)
    torch.testing.assert_close(values.double(), v.double(), atol=1e-4, rtol=0)
    latents = 2 * 2 * 16 * (4 // group) * rank  # K and V: batch · tokens · groups · rank
    held = cache.layers[1].storage.nbytes
    assert held == (latents * 4 if bits == 16 else latents * bits // 8 + 2 * 2 * 16 * (4 // group) * (4 + 1))


def _inputs_seen(model, projection, calibration) -> list[torch.Tensor]:
    """The inputs of ``projection`` (float64) on each calibration sequence, then on ``prompts(2, 16)``."""
    seen = []
    hook = projection.register_forward_hook(lambda m, a, out: seen.append(a[0].double()))
    try:
        with torch.no_grad():
            for row in calibration:
                model(row[None])
            model(prompts(2, 16))
    finally:
        hook.remove()
    return seen


def test_palu_whitened_by_calibration_text():
    """With calibration token ids, the keys and values attention reads are Palu's whitened SVD (S from the Cholesky
    factor of the calibration inputs' Gram matrix, accumulated one sequence at a time) written out from each layer's
    input; on the calibration text itself they are closer to the model's keys than plain SVD's (the whitening's aim)."""
    model = tiny("qwen2", kv_heads=4)
    attn = model.model.layers[1].self_attn
    calibration = prompts(4, 40, seed=5)
    seen = _inputs_seen(model, attn.k_proj, calibration)
    gram = sum(x[0].T @ x[0] for x in seen[:4])
    x = seen[4]
    fast = graphprune.optimize(model, "palu", ratio=0.5, align=8, group=2, calibration=calibration)
    assert fast.report.options["calibration"] == "(4, 40) array"
    with torch.no_grad():
        cache = fast(prompts(2, 16), use_cache=True).cache
        _, values = cache.layers[1].storage.kv()
    v = _palu_reference(x, attn.v_proj.weight, attn.v_proj.bias, 32, 16, 16, gram)
    torch.testing.assert_close(values.double(), v.reshape(2, 16, 4, 16).transpose(1, 2), atol=1e-4, rtol=0)
    calib = torch.cat(seen[:4], 1)
    exact = calib @ attn.k_proj.weight.double().T + attn.k_proj.bias.double()
    error = {w: (_palu_reference(calib, attn.k_proj.weight, attn.k_proj.bias, 32, 16, 16, w) - exact).norm()
             for w in (None, gram)}
    assert error[gram] < 0.9 * error[None]
    with pytest.raises(graphprune.errors.RecipeError, match="at least 16"):  # fewer tokens than latent dimensions
        graphprune.optimize(model, "palu", ratio=0.5, align=8, group=2, calibration=calibration[:1, :10])


def test_palu_fisher_rank_search():
    """search='fisher': the projection weights' Fisher information equals autograd's on a copy of the model (root mean
    over the calibration sequences of each weight's squared loss gradient, one backward pass per sequence); the ranks
    are Palu's allocation written out by hand, over every layer's key and value groups at once (capped groups give
    their share away); the cache holds each group's latent at its own rank, and the values attention reads are each
    group's whitened SVD at that rank."""
    import copy

    from graphprune.kv.calibration import calibrate, weight_fisher
    from graphprune.kv.policies.palu import fisher_ranks

    assert ref.palu_fisher_ranks([[9.0, 1.0], [1.0, 1.0]], 16, 0.5, 1) == [[16, 6], [5, 5]]  # (capped: 19.2 → 16)
    assert fisher_ranks([(torch.tensor([[9.0], [1.0]]).expand(2, 3), torch.ones(2, 3))], 2, 16, 0.5, 1) == [([16, 6], [5, 5])]
    model = tiny("qwen2", kv_heads=4)
    calibration = prompts(3, 40, seed=6)
    fast = graphprune.optimize(model, "palu", ratio=0.5, align=1, group=1, search="fisher", calibration=calibration)
    info = fast.graphprune.info
    fisher, outputs = weight_fisher(model, calibration, info)
    (keys, values), = calibrate(model, calibration, info, False)[0][1:2]  # (the same passes' outputs)
    assert torch.equal(outputs[1][0], keys) and torch.equal(outputs[1][1], values)
    twin = copy.deepcopy(model)
    squares = {}
    for row in calibration:
        twin.zero_grad()
        twin(row[None], labels=row[None]).loss.backward()
        for i, layer in enumerate(twin.model.layers):
            for j, proj in enumerate((layer.self_attn.k_proj, layer.self_attn.v_proj)):
                squares[i, j] = squares.get((i, j), 0) + proj.weight.grad ** 2
    for (i, j), sq in squares.items():
        torch.testing.assert_close(fisher[i][j], (sq / 3).sqrt(), atol=1e-9, rtol=1e-4)
    means = [f.reshape(4, -1).mean(-1).tolist() for pair in fisher for f in pair]
    expected = ref.palu_fisher_ranks(means, 16, 0.5, 1)
    ranks = [[p.encode.shape[-1] for p in projs for _ in range(p.encode.shape[0])] for codec in fast.graphprune.codecs
             for projs in (codec.keys, codec.values)]  # (groups of one rank share a projection)
    assert ranks == expected and len({r for m in ranks for r in m}) > 2  # (the groups' ranks differ)
    assert sum(map(sum, ranks)) == 0.5 * 16 * 4 * 2 * 3
    attn = model.model.layers[2].self_attn
    seen = _inputs_seen(model, attn.v_proj, calibration)
    gram, x = sum(t[0].T @ t[0] for t in seen[:3]), seen[3]
    with torch.no_grad():
        cache = fast(prompts(2, 16), use_cache=True).cache
    _, values = cache.layers[2].storage.kv()
    w, b = attn.v_proj.weight, attn.v_proj.bias
    v = torch.cat([_palu_reference(x, w[16 * g:16 * (g + 1)], b[16 * g:16 * (g + 1)], 16, r, 16, gram)
                   for g, r in enumerate(ranks[5])], -1)
    torch.testing.assert_close(values.double(), v.reshape(2, 16, 4, 16).transpose(1, 2), atol=1e-4, rtol=0)
    assert cache.layers[2].storage.nbytes == 2 * 16 * 4 * (sum(ranks[4]) + sum(ranks[5]))  # float32 latents
    with pytest.raises(graphprune.errors.RecipeError, match="calibration"):
        graphprune.optimize(model, "palu", search="fisher")
    with pytest.raises(graphprune.errors.ScheduleError, match="search must be 'uniform' or 'fisher'"):
        graphprune.optimize(model, "palu", search="fischer", calibration=calibration)


def test_palu_at_full_rank_and_batches():
    """Full rank through the codec reproduces the model; every token compresses alone, so a left-padded batch equals
    each prompt alone; models whose keys are normalised after the projection are refused."""
    ids = prompts(2, 30)
    for family in ("llama", "phi3"):  # (Phi-3: the key and value rows of the fused q/k/v projection)
        model = tiny(family, kv_heads=4)
        full = graphprune.optimize(model, "palu", ratio=0.999, align=1)
        with torch.no_grad():
            expected = model(ids).logits
            out = full(ids, use_cache=True)
            nxt = expected[:, -1:].argmax(-1)
            torch.testing.assert_close(full(nxt, cache=out.cache, use_cache=True).logits[:, -1],
                                       model(torch.cat([ids, nxt], 1)).logits[:, -1], atol=1e-5, rtol=0)
        assert out.cache.layers[0].storage.nk == 31  # (every token went through the latent, the next one too)
    model = tiny(kv_heads=4)
    fast = graphprune.optimize(model, "palu", ratio=0.5, align=8, bits=4)
    ids, mask, alone = left_padded()
    batch = greedy(fast, ids, mask, n=8)
    for i, x in enumerate(alone):
        assert torch.equal(greedy(fast, x, n=8)[0], batch[i])
    with pytest.raises(graphprune.errors.RecipeError, match="k_norm"):
        graphprune.optimize(tiny("qwen3"), "palu")
    with pytest.raises(graphprune.errors.RecipeError, match="does not divide"):
        graphprune.optimize(tiny(kv_heads=4), "palu", group=3)


@pytest.mark.parametrize("n", [1, 8, 12, 20, 28, 36, 96, 160, 224, 352, 480])
def test_hadamard_matrices_are_orthonormal_with_equal_magnitudes(n):
    from graphprune.ops.hadamard import hadamard

    h = hadamard(n)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(h.abs(), torch.full((n, n), n**-0.5, dtype=torch.float64))


# -- Q-Hitter ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha,bits", [(0.5, 4), (0.0, 2), (1.0, 4)])
def test_qhitter_keeps_the_authors_set_and_stores_codes(alpha, bits):
    """Kept sets at every step of a long decode equal a by-hand Q-Hitter (quantised past, exact current call, the
    authors' split of the prompt's shares); the cache holds packed codes and their scales."""
    g = torch.Generator().manual_seed(int(alpha * 10) + bits)
    prompt, total = 40, 70
    keys, values = torch.randn(1, 2, total, 8, generator=g), torch.randn(1, 2, total, 8, generator=g)
    queries = 2 * torch.randn(1, 4, total, 8, generator=g)
    options = dict(heavy=0.3, attention_only=0.1, recent=0.1, alpha=alpha, bits=bits)
    rec = get_recipe("qhitter", **options)
    layer = run_layer(rec, keys, values, queries, prompt)
    assert kept(layer) == ref.qhitter(keys[0], values[0], queries[0], prompt, **options)
    st = layer.storage
    assert st.length == 4 + 7 + 4  # (0.3 − 0.1)·40 is 7.999… in floating point: 7, as the authors' code
    assert st.nbytes == 2 * 15 * (2 * 8 * bits // 8 + 4 * 4)


def test_qhitter_zero_and_batches():
    model, ids = tiny(), prompts(2, 40)
    assert torch.equal(greedy(graphprune.optimize(model, "qhitter", heavy=1.0, bits=16), ids, n=6),
                       greedy(model, ids, n=6))
    fast = graphprune.optimize(model, "qhitter", heavy=0.5, recent=0.2)
    ids = prompts(3, 30, seed=4)
    out = greedy(fast, ids, n=8)
    for i in range(3):
        assert torch.equal(greedy(fast, ids[i:i + 1], n=8)[0], out[i])


# -- KVQuant -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kvquant_setup():
    model = tiny(kv_heads=2)
    calibration = prompts(3, 48, seed=9)
    fast = graphprune.optimize(model, "kvquant", bits=3, outliers=0.05, calibration=calibration)
    return model, calibration, fast


def _projection_outputs(model, ids, layer: int):
    """The key and value projections' outputs (B, T, H) of ``layer`` on ``ids``, with the loss's gradients."""
    import copy

    twin = copy.deepcopy(model)
    grabbed = {}
    attn = twin.model.layers[layer].self_attn
    for name in ("k_proj", "v_proj"):
        getattr(attn, name).register_forward_hook(lambda m, a, out, name=name: grabbed.__setitem__(name, out) or
                                                  out.retain_grad())
    twin(ids, labels=ids, use_cache=False).loss.backward()
    return [(grabbed[n].detach(), grabbed[n].grad) for n in ("k_proj", "v_proj")]


def test_kvquant_calibrates_on_fisher_weighted_percentiles(kvquant_setup):
    """The key bounds are each channel's 0.5·outliers and 1 − 0.5·outliers percentiles of the calibration keys (before
    RoPE); the Fisher weights are the squared loss gradients of the projections' outputs; the codebooks are fixed
    points of weighted k-means over the normalised non-outliers."""
    from graphprune.kv.calibration import calibrate

    model, calibration, fast = kvquant_setup
    info = fast.graphprune.info
    acts, grads = calibrate(model, calibration, info, True)
    for row in range(3):
        (k, gk), (v, gv) = _projection_outputs(model, calibration[row:row + 1], 1)
        torch.testing.assert_close(acts[1][0][row], k[0])
        torch.testing.assert_close(grads[1][0][row], gk[0] ** 2, atol=1e-12, rtol=1e-4)
        torch.testing.assert_close(grads[1][1][row], gv[0] ** 2, atol=1e-12, rtol=1e-4)
    fitted = fast.graphprune.codecs[1].fitted
    keys = acts[1][0].reshape(-1, 32)
    hi, lo = torch.quantile(keys, 0.975, 0), torch.quantile(keys, 0.025, 0)
    torch.testing.assert_close(fitted.key_centre, (hi + lo) / 2)
    torch.testing.assert_close(fitted.key_range, (hi - lo) / 2)
    norm = (keys - fitted.key_centre) / fitted.key_range
    inner = norm.abs() <= 1
    x, w = norm[inner].double(), grads[1][0].reshape(-1, 32)[inner].double()
    levels = fitted.key_levels.double()
    cluster = (x[:, None] - levels[None]).abs().argmin(1)
    for j in range(8):  # each level is the Fisher-weighted mean of the points nearest to it
        if bool((cluster == j).any()):
            mean = (w[cluster == j] * x[cluster == j]).sum() / w[cluster == j].sum()
            assert abs(float(mean - levels[j])) < 1e-4


def test_kvquant_stores_the_papers_dense_and_sparse_codes(kvquant_setup):
    """What attention reads: keys (before RoPE) at their channel's nearest level unless outside the calibrated bounds
    (kept exactly), turned by RoPE; values per token over all heads, outliers (the token's own quantiles) exact, the
    rest at the nearest level of the token's inner range."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model, _, fast = kvquant_setup
    ids = prompts(2, 20, seed=5)
    (k, _), (v, _) = _projection_outputs(model, ids, 1)
    with torch.no_grad():
        cache = fast(ids, use_cache=True).cache
    keys, values = cache.layers[1].storage.kv()
    fit = fast.graphprune.codecs[1].fitted
    norm = (k - fit.key_centre) / fit.key_range
    near = fit.key_levels[(norm[..., None] - fit.key_levels).abs().argmin(-1)] * fit.key_range + fit.key_centre
    expected_k = torch.where(norm.abs() > 1, k, near).reshape(2, 20, 2, 16).transpose(1, 2)
    cos, sin = model.model.rotary_emb(expected_k, torch.arange(20)[None].expand(2, -1))
    expected_k, _ = apply_rotary_pos_emb(expected_k, expected_k, cos, sin)
    torch.testing.assert_close(keys, expected_k, atol=1e-5, rtol=0)
    hi, lo = torch.quantile(v, 0.975, -1, keepdim=True), torch.quantile(v, 0.025, -1, keepdim=True)
    out = (v >= hi) | (v <= lo)
    top = v.masked_fill(out, -float("inf")).amax(-1, keepdim=True)
    bottom = v.masked_fill(out, float("inf")).amin(-1, keepdim=True)
    centre, half = (top + bottom) / 2, (top - bottom) / 2
    nv = (v - centre) / half
    near = fit.value_levels[(nv[..., None] - fit.value_levels).abs().argmin(-1)] * half + centre
    expected_v = torch.where(out, v, near).reshape(2, 20, 2, 16).transpose(1, 2)
    torch.testing.assert_close(values, expected_v, atol=1e-5, rtol=0)
    # sparse outliers: (token int32, channel int16, value) each, padded only to the sequence with most
    storage = cache.layers[1].storage
    for chunk, mask in ((storage.kq[0], norm.abs() > 1), (storage.vq[0], out)):
        *_, rows, cols, exact = chunk.parts
        most = int(mask.flatten(1).sum(-1).max())
        assert rows.shape == cols.shape == exact.shape == (2, most) and (rows.dtype, cols.dtype) == (torch.int32, torch.int16)
        assert int((cols < 32).sum()) == int(mask.sum())


def test_kvquant_holds_exactly_its_formats_bytes(kvquant_setup):
    """Memory as the format implies it (the 2 % target: measured equals it here): 3-bit codes packed eight to three
    bytes, a scale and a centre per token for values (the keys' per-channel ones are the layer's calibration, fixed),
    and each outlier as (token int32, channel int16, value in the model's dtype)."""
    model, _, fast = kvquant_setup
    ids = prompts(1, 24, seed=6)
    (k, _), (v, _) = _projection_outputs(model, ids, 1)
    with torch.no_grad():
        storage = fast(ids, use_cache=True).cache.layers[1].storage
    fit = fast.graphprune.codecs[1].fitted
    n, width = 24, k.shape[-1]
    key_outliers = int((((k - fit.key_centre) / fit.key_range).abs() > 1).sum())
    hi, lo = torch.quantile(v, 0.975, -1, keepdim=True), torch.quantile(v, 0.025, -1, keepdim=True)
    value_outliers = int(((v >= hi) | (v <= lo)).sum())
    codes = 2 * n * width * 3 // 8
    assert storage.nbytes == codes + n * 2 * 4 + (key_outliers + value_outliers) * (4 + 2 + 4)


def test_kvquant_zero_batches_and_refusals(kvquant_setup):
    model, calibration, fast = kvquant_setup
    ids = prompts(2, 30)
    assert torch.equal(greedy(graphprune.optimize(model, "kvquant", bits=16), ids, n=6), greedy(model, ids, n=6))
    ids, mask, alone = left_padded()
    batch = greedy(fast, ids, mask, n=8)
    for i, x in enumerate(alone):
        assert torch.equal(greedy(fast, x, n=8)[0], batch[i])
    # a run appended to the last chunk (each decoding step's) decodes as the two runs apart
    codec, g = fast.graphprune.codecs[1], torch.Generator().manual_seed(3)
    x, pos = 3 * torch.randn(2, 2, 30, 16, generator=g), torch.arange(30).expand(2, 2, 30)
    valid = torch.ones(2, 2, 30, dtype=torch.bool)
    for keys in (True, False):
        a = codec.encode(x[:, :, :20], valid[:, :, :20], pos[..., :20], keys, True)
        b = codec.encode(x[:, :, 20:], valid[:, :, 20:], pos[..., 20:], keys, False)
        apart = torch.cat([a.decode(pos[..., :20]), b.decode(pos[..., 20:])], 2)
        assert torch.equal(codec.join(a, b).decode(pos), apart) and (apart - x).abs().max() < 0.25 * x.abs().max()
    with pytest.raises(graphprune.errors.RecipeError, match="calibration"):
        graphprune.optimize(model, "kvquant")
    with pytest.raises(graphprune.errors.RecipeError, match="k_norm"):
        graphprune.optimize(tiny("qwen3"), "kvquant", calibration=calibration)
    assert fast.report.options["calibration"] == "(3, 48) array"
    phi3 = tiny("phi3")  # fused q/k/v: the key and value columns are calibrated
    fused = graphprune.optimize(phi3, "kvquant", bits=4, calibration=calibration)
    assert fused.graphprune.codecs[0].fitted.key_centre.shape == (2 * 16,)
    assert greedy(fused, ids[:1], n=4).shape == (1, 4)


def test_calibration_under_inference_mode_equals_it_outside(kvquant_setup):
    """KVQuant's and Palu's Fisher calibration need gradients: built inside ``torch.inference_mode()`` (calibration
    ids made there too) they fit what they fit outside it (was: 'element 0 of tensors does not require grad')."""
    model, calibration, fast = kvquant_setup
    with torch.inference_mode():
        inside = graphprune.optimize(model, "kvquant", bits=3, outliers=0.05, calibration=calibration.clone())
        palu = graphprune.optimize(model, "palu", ratio=0.5, align=8, search="fisher", calibration=calibration.clone())
    for a, b in zip(inside.graphprune.codecs, fast.graphprune.codecs):
        torch.testing.assert_close(a.fitted.key_levels, b.fitted.key_levels)
    outside = graphprune.optimize(model, "palu", ratio=0.5, align=8, search="fisher", calibration=calibration)
    assert palu.report.options == outside.report.options
    ids = prompts(2, 20)
    assert torch.equal(greedy(palu, ids, n=4), greedy(outside, ids, n=4))


@pytest.mark.parametrize("recipe", ["palu", "kvquant"])
def test_calibration_that_is_not_token_ids_is_refused_with_what_to_give(recipe):
    """Text, floats, an empty list or ids outside the vocabulary get one clear error naming what to pass, before any
    calibration pass runs."""
    model = tiny("llama", kv_heads=4)
    vocab = model.get_input_embeddings().num_embeddings
    options = {"ratio": 0.5, "align": 8, "group": 2} if recipe == "palu" else {"bits": 4}
    for bad, match in [("some text", "not text"), (torch.rand(2, 40), "integers"), ([], "integers"),
                       (torch.full((1, 40), vocab), rf"\[0, {vocab}\)"), ([[-1] * 40], rf"\[0, {vocab}\)")]:
        with pytest.raises(graphprune.errors.RecipeError, match=match):
            graphprune.optimize(model, recipe, calibration=bad, **options)
