"""Direct implementations of the KV-cache eviction papers on explicit attention patterns.

Each works on one sequence and one KV head, from a matrix of attention *logits* given by
hand (row i: what query i gives every key), with Python lists and sets; no graphprune code.
Scores of the query heads sharing a KV head are averaged (GQA), as graphprune does.
"""

from __future__ import annotations

import torch


def causal_softmax(logits: torch.Tensor, keys: list[int], query: int) -> dict[int, float]:
    """Attention of ``query`` over the visible keys ``keys`` (those ≤ query), as {key: prob}."""
    seen = [k for k in keys if k <= query]
    p = torch.softmax(torch.stack([logits[query, k] for k in seen]).double(), 0)
    return dict(zip(seen, p.tolist()))


def group(logits_per_head: list[torch.Tensor], fn):
    """Average ``fn(logits)`` (a {key: score} dict) over the query heads of a group."""
    out: dict[int, float] = {}
    for lg in logits_per_head:
        for k, v in fn(lg).items():
            out[k] = out.get(k, 0.0) + v / len(logits_per_head)
    return out


def top(scores: dict[int, float], n: int, among: list[int]) -> set[int]:
    return set(sorted(among, key=lambda k: -scores.get(k, 0.0))[:n])


def h2o(heads: list[torch.Tensor], prompt: int, total: int, budget: int, recent: int) -> set[int]:
    """H2O: accumulate every query's attention per key; keep ``recent`` newest + heavy hitters; every step."""
    acc: dict[int, float] = {}
    keys = list(range(prompt))
    for q in range(prompt):  # the prompt: every row of the causal attention matrix
        for k, v in group(heads, lambda lg: causal_softmax(lg, keys, q)).items():
            acc[k] = acc.get(k, 0.0) + v

    def evict(keys):
        if len(keys) <= budget:
            return keys
        newest = keys[-recent:] if recent else []
        heavy = top(acc, budget - recent, [k for k in keys if k not in newest])
        return sorted(heavy | set(newest))

    keys = evict(keys)
    for t in range(prompt, total):
        keys = keys + [t]
        for k, v in group(heads, lambda lg: causal_softmax(lg, keys, t)).items():
            acc[k] = acc.get(k, 0.0) + v
        keys = evict(keys)
    return set(keys)


def snapkv(heads: list[torch.Tensor], prompt: int, budget: int, window: int, kernel: int, pooling: str):
    """SnapKV: the last ``window`` queries vote for earlier keys; votes pooled (zero padded); top budget − window.

    Returns the kept set and the pooled votes (max pooling ties often: any top set is then valid)."""
    if prompt <= budget:
        return set(range(prompt)), {}
    prefix = list(range(prompt - window))
    votes = group(heads, lambda lg: {k: sum(causal_softmax(lg, list(range(prompt)), q).get(k, 0.0)
                                            for q in range(prompt - window, prompt)) for k in prefix})
    v = [votes[k] for k in prefix]
    pooled = {}
    for k in prefix:
        lo, hi = k - kernel // 2, k + kernel // 2
        win = [v[j] if 0 <= j < len(v) else 0.0 for j in range(lo, hi + 1)]
        pooled[k] = sum(win) / kernel if pooling == "avg" else max(v[j] for j in range(max(lo, 0), min(hi, len(v) - 1) + 1))
    return top(pooled, budget - window, prefix) | set(range(prompt - window, prompt)), pooled


def tova(all_heads: list[torch.Tensor], prompt: int, total: int, budget: int) -> set[int]:
    """TOVA: after each step keep the keys the current query attends to most, averaged over all heads."""
    keys = list(range(prompt))
    for t in range(prompt - 1, total):
        if t >= prompt:
            keys = keys + [t]
        if len(keys) > budget:
            att = group(all_heads, lambda lg: causal_softmax(lg, keys, t))
            keys = sorted(top(att, budget, keys))
    return set(keys)


def streaming_llm(prompt: int, total: int, budget: int, sinks: int) -> set[int]:
    """StreamingLLM: the first ``sinks`` tokens plus the most recent budget − sinks."""
    if total <= budget:
        return set(range(total))
    return set(range(sinks)) | set(range(total - (budget - sinks), total))


def pyramidkv_budgets(budget: int, window: int, beta: int, layers: int, prompt: int) -> list[int]:
    """PyramidKV's per-layer budgets: an arithmetic sequence from the bottom layer down, window on top (the authors'
    PyramidKVCluster: the step is (max − min) // num_hidden_layers)."""
    if prompt <= budget:
        return [budget] * layers
    lo = (budget - window) // beta
    hi = 2 * (budget - window) - lo
    if hi >= prompt - window:
        hi = prompt - window
        lo = 2 * (budget - window) - hi
    step = (hi - lo) // layers
    return [hi - i * step + window for i in range(layers)]


def scissorhands(heads: list[torch.Tensor], prompt: int, total: int, budget: int, history: int, recent: int) -> set[int]:
    """Scissorhands: count, over the last ``history`` queries, how often each token got less than the average
    attention 1/t; at the budget drop the most often unimportant (older first on ties), never the ``recent`` newest."""
    keys = list(range(prompt))
    rows: list[dict[int, float]] = []  # per query: {key: share of the group's heads that found it unimportant}

    def record(q):
        low: dict[int, float] = {}
        for lg in heads:
            att = causal_softmax(lg, keys, q)
            for k, v in att.items():
                low[k] = low.get(k, 0.0) + (v < 1.0 / len(att)) / len(heads)
        rows.append(low)

    for q in range(max(0, prompt - history), prompt):
        record(q)

    def evict(keys):
        while len(keys) > budget:
            newest = set(keys[-recent:]) if recent else set()
            count = {k: sum(r.get(k, 0.0) for r in rows[-history:]) for k in keys}
            drop = max((k for k in keys if k not in newest), key=lambda k: (count[k], -k))
            keys = [k for k in keys if k != drop]
        return keys

    keys = evict(keys)
    for t in range(prompt, total):
        keys = keys + [t]
        record(t)
        keys = evict(keys)
    return set(keys)


def minmax_quant(xs: list[float], bits: int) -> list[float]:
    """Asymmetric min-max quantisation of one group, dequantised: min + round((x − min)/scale)·scale."""
    lo, hi = min(xs), max(xs)
    scale = (hi - lo) / (2**bits - 1) or 1.0
    return [lo + min(max(round((x - lo) / scale), 0), 2**bits - 1) * scale for x in xs]


def kivi(keys: torch.Tensor, values: torch.Tensor, prompt: int, bits: int, group: int, residual: int):
    """KIVI on one head: keys (T, D) per channel in groups of ``group`` tokens, quantised a whole residual block
    at a time; values per token (groups of ``group`` channels), all but the newest ``residual``. Returns the
    keys and values attention sees after the last token, and how many of each are quantised."""
    t, d = keys.shape
    nk = prompt - prompt % residual if prompt >= residual else 0
    for n in range(prompt + 1, t + 1):  # each decode step: quantise the residual block once it is full
        if n - nk >= residual:
            nk = n
    nv = max(t - residual, 0)
    k = keys.double().clone()
    for g0 in range(0, nk, group):
        for c in range(d):
            k[g0:g0 + group, c] = torch.tensor(minmax_quant(keys[g0:g0 + group, c].double().tolist(), bits))
    v = values.double().clone()
    vg = group if d % group == 0 else d
    for i in range(nv):
        for c0 in range(0, d, vg):
            v[i, c0:c0 + vg] = torch.tensor(minmax_quant(values[i, c0:c0 + vg].double().tolist(), bits))
    return k, v, nk, nv


def fastgen(heads: list[torch.Tensor], tokens: list[int], prompt: int, total: int, recovery: float, local: float,
            frequent: float, special: set[int], punct: set[int]):
    """FastGen on one KV head: profile the prompt (kept attention mass of each cumulative policy, averaged over
    the prompt's rows; the first reaching ``recovery`` wins, else full), then apply that policy every step.
    Returns (policy index, kept set)."""
    import math

    keys = list(range(prompt))
    window = math.ceil(local * prompt)
    acc = {k: 0.0 for k in keys}
    seen = {k: 0 for k in keys}
    rows = {}
    for q in range(prompt):
        rows[q] = group(heads, lambda lg: causal_softmax(lg, keys, q))
        for k, v in rows[q].items():
            acc[k] += v
            seen[k] += 1

    def masks(keys, now, length):
        sp_only = {k for k in keys if tokens[k] in special}
        sp = sp_only | {k for k in keys if tokens[k] in punct}
        others = sorted((k for k in keys if k not in sp), key=lambda k: -acc[k] / max(seen[k], 1))
        freq = set(others[:math.ceil(frequent * length)])
        return [sp_only, sp, sp | freq, sp | freq | {k for k in keys if now - k < window}, set(keys)]

    policy = 4
    if recovery < 1.0:
        base = masks(keys, prompt - 1, prompt)
        for p in range(4):
            kept = base[p] if p < 3 else base[2]
            mass = sum(sum(v for k, v in rows[q].items() if k in kept or (p == 3 and q - k < window))
                       for q in range(prompt)) / prompt
            if mass >= recovery:
                policy = p
                break
    keys = sorted(masks(keys, prompt - 1, prompt)[policy])
    for t in range(prompt, total):
        keys = keys + [t]
        acc[t], seen[t] = 0.0, 0
        for k, v in group(heads, lambda lg: causal_softmax(lg, keys, t)).items():
            acc[k] += v
            seen[k] += 1
        keys = sorted(masks(keys, t, t + 1)[policy])
    return policy, set(keys)


def pyramidinfer_prompt(all_heads: list[torch.Tensor], n: int, layer: int, layers: int, recent: float, decay: float,
                        distance_weight: float, sinks: int, min_context: int) -> set[int] | None:
    """PyramidInfer's prompt selection at one layer: the last 1 + ⌊n·recent⌋ queries' attention (all heads
    averaged, later queries weighted up linearly to ``distance_weight``) picks int(context · r(layer)) context
    tokens, sinks always in, r(l) = (1 − decay)(cos(πl/L) + 1)/2 + decay. None: the layer does not compress."""
    import math

    window = 1 + int(n * recent)
    context = n - window
    ratio = (1 - decay) * (math.cos(math.pi * layer / layers) + 1) / 2 + decay
    keep = int(context * ratio)
    if context <= min_context or ratio >= 1 or keep <= min_context:
        return None
    keys = list(range(n))
    score = {k: 0.0 for k in range(context)}
    for j, q in enumerate(range(n - window, n)):
        w = 1.0 + (distance_weight - 1.0) * j / (window - 1) if window > 1 else 1.0
        att = group(all_heads, lambda lg: causal_softmax(lg, keys, q))
        for k in range(context):
            score[k] += w * att.get(k, 0.0) / window
    for k in range(min(sinks, context)):
        score[k] = math.inf
    return top(score, keep, list(range(context))) | set(range(context, n))


class LazyLLM:
    """LazyLLM on one sequence of a Hugging Face Llama, by the paper's definition, with dicts and sets.

    Each forward starts with every token selected. Layer l computes the rows: this forward's
    surviving tokens plus the selected ones without keys and values at l, whose hidden states
    come from the Aux Cache of layer l - 1. Each row attends (causally, by position) over the
    selected tokens' keys at l. Then the last token's attention, averaged over heads, ranks the
    tokens it saw; the lowest ``int(rate * seen)`` (never the last token) are deselected, and the
    ones computed here go to the Aux Cache of layer l. The attention is written out by hand.
    """

    def __init__(self, model, rate_at, revive: bool = True):
        self.model, self.rate_at, self.revive = model, rate_at, revive  # revive False: no Aux Cache; a token a
        # layer holds no keys and values for is not seen there (an evicting cache filled in from outside)
        n = model.config.num_hidden_layers
        self.kv: list[dict[int, tuple]] = [{} for _ in range(n)]  # position -> (key (Hkv, D), value (Hkv, D))
        self.aux: list[dict[int, torch.Tensor]] = [{} for _ in range(n)]  # position -> hidden state
        self.pruned: list[list[set[int]]] = []  # per forward, per layer: deselected positions
        self.revived = 0

    def forward(self, tokens: list[int], start: int) -> torch.Tensor:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        dec, cfg = self.model.model, self.model.config
        hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        d = cfg.hidden_size // hq
        last = start + len(tokens) - 1
        hidden = {start + i: dec.embed_tokens.weight[t] for i, t in enumerate(tokens)}
        selected = set(range(last + 1))
        self.pruned.append([])
        for l, layer in enumerate(dec.layers):
            for p in sorted(selected):
                if p not in self.kv[l] and p not in hidden and self.revive:
                    hidden[p] = self.aux[l - 1][p]
                    self.revived += 1
            rows = sorted(hidden)
            x = torch.stack([hidden[p] for p in rows])
            a = layer.self_attn
            xn = layer.input_layernorm(x)
            q = a.q_proj(xn).view(len(rows), hq, d).transpose(0, 1)[None]
            k = a.k_proj(xn).view(len(rows), hkv, d).transpose(0, 1)[None]
            v = a.v_proj(xn).view(len(rows), hkv, d)
            cos, sin = dec.rotary_emb(x[None], torch.tensor([rows]))
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            for i, p in enumerate(rows):
                self.kv[l][p] = (k[0, :, i], v[i])
            outs, last_probs = [], None
            for i, p in enumerate(rows):
                seen = [s for s in sorted(self.kv[l]) if s in selected and s <= p]
                keys = torch.stack([self.kv[l][s][0] for s in seen], 1)  # (Hkv, n, D)
                values = torch.stack([self.kv[l][s][1] for s in seen], 1)
                heads = []
                probs = []
                for h in range(hq):
                    g = h // (hq // hkv)
                    w = torch.softmax((keys[g] @ q[0, h, i]) * a.scaling, 0)
                    probs.append(w)
                    heads.append(w @ values[g])
                outs.append(torch.cat(heads))
                if p == last:
                    last_probs = dict(zip(seen, torch.stack(probs).mean(0).tolist()))
            x = x + a.o_proj(torch.stack(outs))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            rate = self.rate_at(l)
            among = sorted((s for s in last_probs if s != last), key=lambda s: last_probs[s])
            prune = set(among[:int(rate * len(last_probs))])
            selected -= prune
            self.pruned[-1].append(prune)
            hidden = {}
            for i, p in enumerate(rows):
                if p not in prune:
                    hidden[p] = x[i]
                elif l < len(dec.layers) - 1:
                    self.aux[l][p] = x[i]
        return self.model.lm_head(dec.norm(hidden[last]))

    def generate(self, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
        """Greedy: the prompt, then one token per forward; the new tokens and each forward's logits."""
        logits = [self.forward(prompt, 0)]
        out = []
        for _ in range(steps):
            out.append(int(logits[-1].argmax()))
            logits.append(self.forward([out[-1]], len(prompt) + len(out) - 1))
        return out, logits


def rocketkv_plan(budget: int, prompt: int, new_tokens: int, head_dim: int) -> tuple[int, int, int, int]:
    """RocketKV's split of a token budget (NVlabs/RocketKV, infllm_utils.compress and rocket.py): prompt tokens kept by
    stage 1, stage 2's top-k, page size, channels."""
    import math

    total = prompt + new_tokens
    ratio = max(1.0, total / budget)
    alpha = min(0.2 + 0.06 * math.log2(ratio), 0.8)
    capacity = max(math.floor(total / ratio**alpha), min(2 * new_tokens, total))
    ratio2 = max(1.0, capacity / budget)
    page = math.ceil(math.sqrt(ratio2))
    if page > ratio2:
        page = 1
    channels = min(max(math.floor(head_dim * page / ratio2), 1), head_dim)
    return capacity - new_tokens, budget // 2, page, channels


def rocketkv_step(queries: list[list[float]], keys: list[list[float]], k: int, page: int, channels: int) -> set[int]:
    """RocketKV's stage 2 for one KV head: the slots (cache order) that a decoding step's query heads ``queries`` (g
    lists of D) attend to, by the approximate scores over the page bounds of ``keys`` (N lists of D). Ties go to the
    earlier slot."""
    import math

    g, d, n = len(queries), len(queries[0]), len(keys)
    sign = [1.0 if sum(q[i] for q in queries) > 0 else -1.0 for i in range(d)]
    importance = [sum(abs(q[i]) for q in queries) / g for i in range(d)]
    chosen = sorted(range(d), key=lambda i: (-importance[i], i))[:channels]
    bounds = []
    for start in range(0, n, page):
        members = keys[start:start + page]
        bounds.append([max(m[i] for m in members) if sign[i] > 0 else min(m[i] for m in members) for i in range(d)])
    probs = [0.0] * n
    for q in queries:
        tau = math.sqrt(d * sum(abs(q[i]) for i in chosen) / sum(abs(x) for x in q))
        scores = [sum(q[i] * bounds[j // page][i] for i in chosen) / tau for j in range(n)]
        top_score = max(scores)
        e = [math.exp(s - top_score) for s in scores]
        for j in range(n):
            probs[j] += e[j] / sum(e) / g
    return set(sorted(range(n), key=lambda j: (-probs[j], j))[:min(k, n)])


def gear(x: torch.Tensor, keys: bool, bits: int, group: int, share: float, iterations: int,
         start: torch.Tensor) -> torch.Tensor:
    """GEAR on one chunk of one sequence, ``x`` (H, n, D) keys or values: per row (keys: a channel over the tokens;
    values: a token over every head's entries) the ⌊share·len/2⌋ largest and smallest entries are kept exactly and
    replaced by the row's mean, the row is quantised in groups of ``group`` (min-max), the outliers go back; then per
    head the error's projection on the span of E (EᵀE)^(iterations−1) ``start`` is added. Returns what attention reads."""
    h, n, d = x.shape
    x = x.double()
    if keys:
        rows = [x[i, :, c].tolist() for i in range(h) for c in range(d)]
    else:
        rows = [x[:, t, :].reshape(-1).tolist() for t in range(n)]
    out = []
    for row in rows:
        k = int(share * len(row) / 2)
        order = sorted(range(len(row)), key=lambda j: row[j])
        kept = set(order[:k]) | set(order[len(row) - k:]) if k else set()
        mean = sum(row) / len(row)
        filled = [mean if j in kept else v for j, v in enumerate(row)]
        g = group if len(row) % group == 0 else len(row)
        quant = [v for s in range(0, len(row), g) for v in minmax_quant(filled[s:s + g], bits)]
        out.append([row[j] if j in kept else quant[j] for j in range(len(row))])
    if keys:
        y = torch.tensor(out, dtype=torch.double).reshape(h, d, n).transpose(1, 2)
    else:
        y = torch.tensor(out, dtype=torch.double).reshape(n, h, d).transpose(0, 1)
    result = y.clone()
    for i in range(h):
        e = x[i] - y[i]
        p = start.double()
        for _ in range(iterations - 1):
            p = e.T @ (e @ p)
        q = torch.linalg.svd(e @ p, full_matrices=False).U  # an orthonormal basis of the same span
        result[i] += q @ q.T @ e
    return result


def zero_point_quant(x: list[float], bits: int) -> list[float]:
    """Asymmetric quantisation with an integer zero point (Q-Hitter's and Palu's code), dequantised."""
    levels = 2**bits - 1
    scale = max(max(x) - min(x), 1e-5) / levels
    zero = min(max(round(-min(x) / scale), 0), levels)
    return [(min(max(round(v / scale) + zero, 0), levels) - zero) * scale for v in x]


def qhitter(keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor, prompt: int, bits: int, heavy: float,
            attention_only: float, recent: float, alpha: float) -> list[set[int]]:
    """Q-Hitter on one sequence (scaling 1): ``keys``/``values`` (Hkv, T, D), ``queries`` (Hq, T, D). Past tokens are
    read quantised, the current call's exactly; accumulated attention summed over a KV head's query heads;
    friendliness 1 − (ẽ_K + ẽ_V)/2 normalised over the heads and tokens that entered together; kept per head: the
    best by attention alone, then by α·normalised attention + (1 − α)·friendliness, plus the newest."""
    import math

    hkv, t, _ = keys.shape
    g = queries.shape[0] // hkv
    deq = {(h, j): (torch.tensor(zero_point_quant(keys[h, j].tolist(), bits), dtype=torch.double),
                    torch.tensor(zero_point_quant(values[h, j].tolist(), bits), dtype=torch.double))
           for h in range(hkv) for j in range(t)}
    err = {k: (float((deq[k][0] - keys[k].double()).norm()), float((deq[k][1] - values[k].double()).norm()))
           for k in deq}
    n_att, n_hh, n_rec = int(attention_only * prompt), int((heavy - attention_only) * prompt), int(recent * prompt)
    kept = [list(range(prompt)) for _ in range(hkv)]
    acc = [dict() for _ in range(hkv)]
    friendly = [dict() for _ in range(hkv)]

    def enter(new: list[int]):
        for which in (0, 1):
            vals = [err[(h, j)][which] for h in range(hkv) for j in new]
            lo, hi = min(vals), max(vals)
            for h in range(hkv):
                for j in new:
                    e = (err[(h, j)][which] - lo) / (hi - lo) if hi > lo else 0.0
                    friendly[h][j] = friendly[h].get(j, 1.0) - e / 2

    def attend(q: int, new: set[int]):
        for h in range(hkv):
            seen = [j for j in kept[h] if j <= q]
            ks = torch.stack([keys[h, j].double() if j in new else deq[(h, j)][0] for j in seen])
            for qh in range(h * g, h * g + g):
                p = torch.softmax(ks @ queries[qh, q].double(), 0)
                for j, v in zip(seen, p.tolist()):
                    acc[h][j] = acc[h].get(j, 0.0) + v

    def evict():
        cap = n_att + n_hh + n_rec
        everything = [acc[h][j] for h in range(hkv) for j in kept[h]]
        lo, hi = min(everything), max(everything)
        for h in range(hkv):
            if len(kept[h]) <= cap:
                continue
            newest = kept[h][-n_rec:] if n_rec else []
            cands = [j for j in kept[h] if j not in newest]
            first = sorted(cands, key=lambda j: -acc[h][j])[:n_att]
            combined = {j: alpha * (acc[h][j] - lo) / (hi - lo) + (1 - alpha) * friendly[h][j] for j in cands}
            rest = sorted([j for j in cands if j not in first], key=lambda j: -combined[j])[:n_hh]
            kept[h] = sorted(set(first) | set(rest) | set(newest))

    for q in range(prompt):
        attend(q, set(range(prompt)))
    enter(list(range(prompt)))
    evict()
    for step in range(prompt, t):
        for h in range(hkv):
            kept[h].append(step)
        attend(step, {step})
        enter([step])
        evict()
    return [set(k) for k in kept]


def palu_fisher_ranks(means: list[list[float]], dims: int, ratio: float, align: int) -> list[list[int]]:
    """Palu's Fisher rank search over modules (layer 0's keys, its values, layer 1's keys, ...), each a list of its
    groups' mean Fisher information: the total rank (ratio of all groups' dimensions) shared in proportion, each share
    floored and capped at ``dims``; the ranks still missing go one at a time, in passes, to the groups whose shares
    had the smallest fractional parts (full groups skipped); each rank then rounded to a multiple of ``align``."""
    target = ratio * dims * sum(len(m) for m in means)
    total = sum(sum(m) for m in means)
    shares = {(i, g): target * f / total for i, m in enumerate(means) for g, f in enumerate(m)}
    ranks = {key: min(dims, int(share)) for key, share in shares.items()}
    missing = int(target) - sum(ranks.values())
    order = sorted(shares, key=lambda key: shares[key] - ranks[key])
    while missing > 0:
        for key in order:
            if missing and ranks[key] < dims:
                ranks[key] += 1
                missing -= 1
    return [[min(dims, max(1, round(ranks[i, g] / align)) * align) for g in range(len(m))] for i, m in enumerate(means)]
