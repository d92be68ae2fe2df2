"""Direct, per-sample implementations of the published algorithms, written from the papers'
definitions (REFERENCE.md), independent of graphprune's ops: loops over samples and tokens."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def tome_merge_one(x, size, metric, r, cls: bool, dist: bool):
    """One sample: x (N, C), size (N,), metric (N, d). Published ToMe bipartite soft matching."""
    n = x.shape[0]
    m = metric / metric.norm(dim=-1, keepdim=True)
    a_pos, b_pos = list(range(0, n, 2)), list(range(1, n, 2))
    best, match = [], []
    for ia, pa in enumerate(a_pos):
        row = [float(m[pa] @ m[pb]) for pb in b_pos]
        if cls and ia == 0:
            row = [-math.inf] * len(row)
        if dist:
            row[0] = -math.inf
        j = max(range(len(row)), key=lambda k: row[k])
        best.append(row[j])
        match.append(j)
    order = sorted(range(len(a_pos)), key=lambda i: -best[i])
    merged, unm = order[:r], order[r:]
    if cls:
        unm = sorted(unm)
    tot_x = [size[pb] * x[pb] for pb in b_pos]
    tot_s = [size[pb].clone() for pb in b_pos]
    for i in merged:
        j = match[i]
        tot_x[j] = tot_x[j] + size[a_pos[i]] * x[a_pos[i]]
        tot_s[j] = tot_s[j] + size[a_pos[i]]
    dst_x = [tx / ts for tx, ts in zip(tot_x, tot_s)]
    unm_x = [x[a_pos[i]] for i in unm]
    unm_s = [size[a_pos[i]] for i in unm]
    if dist:
        xs = [unm_x[0], dst_x[0]] + unm_x[1:] + dst_x[1:]
        ss = [unm_s[0], tot_s[0]] + unm_s[1:] + tot_s[1:]
    else:
        xs, ss = unm_x + dst_x, unm_s + tot_s
    return torch.stack(xs), torch.stack(ss)


def _attention(attn, h, bias=None):
    b, n, c = h.shape
    qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q @ k.transpose(-2, -1)) * attn.scale
    if bias is not None:
        logits = logits + bias
    probs = logits.softmax(dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(b, n, c)
    return attn.proj(attn.norm(out)), k, probs


def _embed(model, x):
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    return model.norm_pre(x)


def _head(model, x, size, prefix: int):
    x = model.norm(x)
    if model.global_pool == "avg":
        if size is None:
            x = x[:, prefix:].mean(dim=1)
        else:
            s = size[:, prefix:]
            x = (x[:, prefix:] * s).sum(1) / s.sum(1)
    else:
        x = x[:, 0]
    return model.head(model.fc_norm(x))


@torch.no_grad()
def tome_reference(model, x, rs: list[int], prop_attn: bool = True, metric: str = "keys"):
    """Published ToMe on a timm VisionTransformer (cls / distillation token aware).

    ``metric``: the published head-averaged keys, or graphprune's alternatives ``keys_concat``
    (each head's keys normalised, heads side by side) and ``tokens`` (the tokens after attention).
    """
    cls = model.cls_token is not None
    dist = getattr(model, "dist_token", None) is not None
    prefix = model.num_prefix_tokens
    assert prefix == int(cls) + int(dist), "the published algorithm knows cls and dist tokens only"
    if dist:
        x = model.patch_embed(x)
        x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), model.dist_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = model.pos_drop(x + model.pos_embed)
    else:
        x = _embed(model, x)
    size = None
    for blk, r in zip(model.blocks, rs):
        bias = size.log()[:, None, None, :, 0] if (prop_attn and size is not None) else None
        out, k, _ = _attention(blk.attn, blk.norm1(x), bias)
        x = x + blk.ls1(out)
        r = min(r, (x.shape[1] - prefix) // 2)
        if r > 0:
            if metric == "keys":
                feats = k.mean(dim=1)
            elif metric == "keys_concat":
                feats = torch.cat([k[:, h] / k[:, h].norm(dim=-1, keepdim=True) for h in range(k.shape[1])], dim=-1)
            else:
                feats = x
            s = size if size is not None else torch.ones(x.shape[0], x.shape[1], 1)
            outs = [tome_merge_one(x[i], s[i], feats[i], r, cls, dist) for i in range(x.shape[0])]
            x = torch.stack([o[0] for o in outs])
            size = torch.stack([o[1] for o in outs])
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    if dist:
        x = model.norm(x)
        return (model.head(x[:, 0]) + model.head_dist(x[:, 1])) / 2
    return _head(model, x, size, prefix)


@torch.no_grad()
def evit_reference(model, x, keep: float, locations: list[int]):
    """Published EViT: keep the top ceil(keep·(N−1)) tokens by cls attention, fuse the rest."""
    x = _embed(model, x)
    for i, blk in enumerate(model.blocks):
        out, _, probs = _attention(blk.attn, blk.norm1(x))
        x = x + blk.ls1(out)
        n = x.shape[1]
        k = math.ceil(keep * (n - 1))
        if i in locations and k < n - 1:
            rows = []
            for b in range(x.shape[0]):
                score = probs[b, :, 0, 1:].mean(dim=0)
                top = sorted(range(n - 1), key=lambda t: -float(score[t]))[:k]
                rest = [t for t in range(n - 1) if t not in top]
                fused = sum(score[t] * x[b, 1 + t] for t in rest)
                rows.append(torch.stack([x[b, 0]] + [x[b, 1 + t] for t in top] + [fused]))
            x = torch.stack(rows)
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    return _head(model, x, None, model.num_prefix_tokens)


def _blocks(model, x, reduce, prop_attn: bool):
    """Run a timm ViT (cls token) block by block; ``reduce(i, b, x_b, size_b, probs_b, k_b, v_b)`` returns the
    reduced (x_b, size_b) of sample b after block i's attention residual."""
    x = _embed(model, x)
    size = torch.ones(x.shape[0], x.shape[1], 1)
    for i, blk in enumerate(model.blocks):
        h = blk.norm1(x)
        bias = size.log()[:, None, None, :, 0] if prop_attn else None
        out, k, probs = _attention(blk.attn, h, bias)
        b, n, c = h.shape
        v = blk.attn.qkv(h).reshape(b, n, 3, blk.attn.num_heads, c // blk.attn.num_heads).permute(2, 0, 3, 1, 4)[2]
        x = x + blk.ls1(out)
        outs = [reduce(i, j, x[j], size[j], probs[j], k[j], v[j]) for j in range(x.shape[0])]
        x = torch.stack([o[0] for o in outs])
        size = torch.stack([o[1] for o in outs])
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    return _head(model, x, size, model.num_prefix_tokens)


def _ranked(score) -> list[int]:
    """Patch tokens (1..N-1) by descending score; ties: lower index first."""
    return sorted(range(1, score.shape[0] + 1), key=lambda t: (-float(score[t - 1]), t))


def _cos(a, b):
    return float(a @ b / (a.norm().clamp(min=1e-6) * b.norm().clamp(min=1e-6)))


@torch.no_grad()
def diffrate_reference(model, x, prune: list[int], merge: list[int]):
    """DiffRate: sort by cls attention, keep prune[i] tokens, merge the tail past merge[i] into the most
    similar head token (cosine of x; plain mean; size += sim·size). Block 0 untouched; prop. attention on."""

    def reduce(i, b, xb, sb, probs, k, v):
        n = xb.shape[0]
        if i == 0 or merge[i] >= n:
            return xb, sb
        order = _ranked(probs[:, 0, 1:].mean(dim=0))[: prune[i] - 1]
        head, tail = order[: merge[i] - 1], order[merge[i] - 1 :]
        groups = {h: [h] for h in head}
        sizes = {h: sb[h].clone() for h in head}
        for t in tail:
            sims = [_cos(xb[t], xb[h]) for h in head]
            j = max(range(len(head)), key=lambda q: sims[q])
            groups[head[j]].append(t)
            sizes[head[j]] = sizes[head[j]] + sims[j] * sb[t]
        rows = [xb[0]] + [torch.stack([xb[g] for g in groups[h]]).mean(0) for h in head]
        return torch.stack(rows), torch.stack([sb[0]] + [sizes[h] for h in head])

    return _blocks(model, x, reduce, prop_attn=True)


@torch.no_grad()
def tps_reference(model, x, keep: float, locations: list[int]):
    """Training-free TPS: keep int(P·keep^(k+1)) tokens by cls attention at the k-th location; squeeze each
    pruned token into its most similar kept token with softmax weights over cosine similarities (host: 1)."""
    patches = None

    def reduce(i, b, xb, sb, probs, k, v):
        nonlocal patches
        patches = patches or xb.shape[0] - 1
        if i not in locations:
            return xb, sb
        count = int(patches * keep ** (locations.index(i) + 1))
        order = _ranked(probs[:, 0, 1:].mean(dim=0))
        kept, pruned = order[:count], order[count:]
        num = {h: math.e * xb[h] for h in kept}
        den = {h: math.e for h in kept}
        tot = {h: sb[h].clone() for h in kept}
        for t in pruned:
            sims = [_cos(xb[t], xb[h]) for h in kept]
            j = max(range(len(kept)), key=lambda q: sims[q])
            w = math.exp(sims[j])
            num[kept[j]] = num[kept[j]] + w * xb[t]
            den[kept[j]] += w
            tot[kept[j]] = tot[kept[j]] + sb[t]
        rows = [xb[0]] + [num[h] / den[h] for h in kept]
        return torch.stack(rows), torch.stack([sb[0]] + [tot[h] for h in kept])

    return _blocks(model, x, reduce, prop_attn=False)


@torch.no_grad()
def ppt_reference(model, x, r: int, locations: list[int], threshold: float):
    """PPT: significance = cls attention (head sum) × ‖v‖, normalised; variance < threshold: ToMe merge of r
    tokens, else keep the N-1-r most significant (descending). Sizes tracked, proportional attention on."""

    def reduce(i, b, xb, sb, probs, k, v):
        n = xb.shape[0]
        rr = min(r, (n - 1) // 2)
        if i not in locations or rr == 0:
            return xb, sb
        sig = probs[:, 0, 1:].sum(dim=0) * v.transpose(0, 1).flatten(1).norm(dim=-1)[1:]
        sig = sig / sig.sum()
        if float(sig.var()) < threshold:
            return tome_merge_one(xb, sb, k.mean(dim=0), rr, cls=True, dist=False)
        order = [0] + _ranked(sig)[: n - 1 - rr]
        return xb[order], sb[order]

    return _blocks(model, x, reduce, prop_attn=True)


def pitome_merge_one(x, size, metric, r, protected, margin, all_pairs):
    """One sample: PiToMe energy ordering, then bipartite (all_pairs) or top-2r merging, size-weighted."""
    n = x.shape[0]
    toks = list(range(protected, n))
    m = {i: metric[i] / metric[i].norm() for i in toks}
    energy = {i: sum(float(F.elu(m[i] @ m[j] - margin)) for j in toks) / len(toks) for i in toks}
    order = sorted(toks, key=lambda i: (-energy[i], i))
    pool = order if all_pairs else order[: 2 * r]
    a, b = pool[0::2], pool[1::2]
    best = {i: max(b, key=lambda j: (float(m[i] @ m[j]), -b.index(j))) for i in a}
    if all_pairs:
        merged = sorted(a, key=lambda i: (-float(m[i] @ m[best[i]]), a.index(i)))[:r]
        kept = [i for i in a if i not in merged]
    else:
        merged, kept = a, order[2 * r :]
    out_x, out_s = [], []
    for i in list(range(protected)) + kept:
        out_x.append(x[i])
        out_s.append(size[i])
    for j in b:
        group = [j] + [i for i in merged if best[i] == j]
        s = sum(size[i] for i in group)
        out_x.append(sum(size[i] * x[i] for i in group) / s)
        out_s.append(s)
    return torch.stack(out_x), torch.stack(out_s)


@torch.no_grad()
def pitome_reference(model, x, ratio: float, margin: float = 0.75):
    """PiToMe on a timm ViT: r = floor(T - T·ratio) per block, margin 0.75 - 0.75·l/L, bipartite in the first
    ceil(L/2) blocks, top-2r afterwards; no proportional attention."""
    depth = len(model.blocks)

    def reduce(i, b, xb, sb, probs, k, v):
        t = xb.shape[0] - 1
        r = min(math.floor(t - t * ratio), t // 2)
        if r <= 0:
            return xb, sb
        return pitome_merge_one(xb, sb, k.mean(dim=0), r, 1, margin - margin * i / depth, i < math.ceil(depth / 2))

    return _blocks(model, x, reduce, prop_attn=False)


def bipartite_merge_one(x, size, metric, src, dst, r, protected):
    """One sample: ToMe soft matching over a given split (A = src positions, B = dst positions)."""
    m = metric / metric.norm(dim=-1, keepdim=True)
    best, match = [], []
    for a in src:
        row = [float(m[a] @ m[b]) for b in dst]
        j = max(range(len(dst)), key=lambda q: row[q])
        best.append(row[j])
        match.append(j)
    order = sorted(range(len(src)), key=lambda i: (-best[i], i))
    merged, unm = order[:r], sorted(order[r:])
    tot_x = [size[b] * x[b] for b in dst]
    tot_s = [size[b].clone() for b in dst]
    for i in merged:
        tot_x[match[i]] = tot_x[match[i]] + size[src[i]] * x[src[i]]
        tot_s[match[i]] = tot_s[match[i]] + size[src[i]]
    xs = [x[p] for p in range(protected)] + [x[src[i]] for i in unm] + [t / s for t, s in zip(tot_x, tot_s)]
    ss = [size[p] for p in range(protected)] + [size[src[i]] for i in unm] + tot_s
    return torch.stack(xs), torch.stack(ss)


@torch.no_grad()
def tome_split_reference(model, x, rs: list[int], split: str, k: int = 2, seed: int = 0):
    """ToMe with the published random split (A = r random tokens, all merge) or k-th split (B = every k-th
    token, the r best-matched A tokens merge), class token protected, proportional attention on."""
    import random

    def reduce(i, b, xb, sb, probs, keys, v):
        n = xb.shape[0]
        if split == "random":
            order = list(range(1, n))
            random.Random(seed * 100003 + i).shuffle(order)
            r = min(rs[i], n - 2)
            src, dst = order[:r], order[r:]
        else:
            dst = [t for t in range(1, n) if (t - 1) % k == k - 1]
            src = [t for t in range(1, n) if t not in dst]
            r = min(rs[i], len(src))
        if r == 0:
            return xb, sb
        return bipartite_merge_one(xb, sb, keys.mean(dim=0), src, dst, r, 1)

    return _blocks(model, x, reduce, prop_attn=True)


def ats_pick(score, samples: int) -> list[int]:
    """Official ATS inverse-transform sampling of one image whose tokens were really dropped (DROP_TOKENS, one
    image at a time): ``score`` (n,) holds the significance of the patch tokens that are still there.

    Significance normalised to sum 1 and sorted ascending (ties: lower index); its running sum is min-max
    normalised, the minimum being the running sum at the least significant token, i.e. that token's own
    score, so the normalised CDF starts at exactly 0. ``samples`` points spaced evenly from the smallest
    non-zero normalised value to 1; each takes the token with the nearest normalised value (ties: the
    earlier one). Returns the distinct picks as token indices, in ascending significance."""
    sig = score / score.sum()
    order = sorted(range(sig.shape[0]), key=lambda j: (float(sig[j]), j))
    cdf = torch.cumsum(sig[order], dim=0)  # float32 throughout, as the official code
    norm = (cdf - cdf.min()) / (cdf.max() - cdf.min())
    start = norm[norm != 0].min()
    ys = (start + torch.arange(samples, dtype=torch.float32) / (samples - 1) * (1 - start)).tolist()
    norm = norm.tolist()
    picked = {min(range(len(norm)), key=lambda j: (abs(y - norm[j]), j)) for y in ys}
    return [order[p] for p in sorted(picked)]


@torch.no_grad()
def ats_reference(model, x, samples: int, locations: list[int], counts: bool = False):
    """ATS run image by image with real compaction: after the attention residual of each sampling block the
    significance is the class token's attention summed over heads times the norm of the token's value
    vector (all heads), the class token excluded; :func:`ats_pick` chooses the tokens and only those (after
    the class token, in ascending significance) go on. ``counts``: also return, per image, the token count
    (class token included) after each sampling block."""
    logits, kept = [], []
    for b in range(x.shape[0]):
        t = _embed(model, x[b : b + 1])
        seen = []
        for i, blk in enumerate(model.blocks):
            h = blk.norm1(t)
            out, _, probs = _attention(blk.attn, h)
            c = h.shape[2]
            v = blk.attn.qkv(h)[0, :, 2 * c :]  # (n, C): every head's value, side by side
            t = t + blk.ls1(out)
            if i in locations:
                score = probs[0, :, 0, 1:].sum(dim=0) * v[1:].norm(dim=-1)
                t = t[:, [0] + [1 + j for j in ats_pick(score, samples)]]
                seen.append(t.shape[1])
            t = t + blk.ls2(blk.mlp(blk.norm2(t)))
        logits.append(_head(model, t, None, model.num_prefix_tokens))
        kept.append(seen)
    return (torch.cat(logits), kept) if counts else torch.cat(logits)


def _wpr_one(probs, iterations):
    """Weighted PageRank of one image: probs (H, N, N); cls starts √N times the others; RMS over the heads
    whose variance of N·s lies in [0.01, 0.7] (all heads when none does)."""
    h, n, _ = probs.shape
    start = torch.tensor([math.sqrt(n)] + [1.0] * (n - 1))
    per_head = []
    for head in range(h):
        s = start / start.sum()
        for _ in range(iterations):
            s = probs[head].T @ s  # s_j = sum_i s_i A_ij
        per_head.append(s)
    ok = [s for s in per_head if 0.01 <= float((s * n).var(unbiased=False)) <= 0.7] or per_head
    return torch.stack([s * s for s in ok]).mean(0).sqrt()


@torch.no_grad()
def zero_tprune_reference(model, x, keep: float, similar: float, locations: list[int]):
    """Zero-TPrune, I′ → S → I: one-iteration importance splits the patch tokens in halves; the S-stage drops
    the round(similar·R) less-important tokens most similar (key cosine) to the important half; the I-stage
    keeps the ceil(keep·(N-1)) most important of the rest (converged WPR: 30/10/1 iterations by depth)."""
    depth = len(model.blocks)

    def reduce(i, b, xb, sb, probs, k, v):
        n = xb.shape[0]
        kept = math.ceil(keep * (n - 1))
        if i not in locations or kept >= n - 1:
            return xb, sb
        iters = (30, 10, 1)[min(3 * i // depth, 2)]
        rough, imp = _wpr_one(probs, 1), _wpr_one(probs, iters)
        order = _ranked(rough[1:])
        half_b, half_a = order[: (n - 1) - (n - 1) // 2], order[(n - 1) - (n - 1) // 2 :]
        metric = k.mean(dim=0)
        best = {a: max(_cos(metric[a], metric[t]) for t in half_b) for a in half_a}
        drop = round(similar * (n - 1 - kept))
        gone = set(sorted(half_a, key=lambda a: (-best[a], half_a.index(a)))[:drop])
        rest = [t for t in _ranked(imp[1:]) if t not in gone][:kept]
        return xb[[0] + rest], sb[[0] + rest]

    return _blocks(model, x, reduce, prop_attn=False)


@torch.no_grad()
def evo_vit_reference(model, x, keep: float, starts: list[int], alpha: float = 0.5):
    """Evo-ViT (DeiT release, inference): g = cls attention summed over heads (block before the first stage);
    each stage runs its blocks on cls + the int(keep·P) patch tokens of highest g, updating their g as
    (1-α)·g + α·g_block; the slow tokens stay frozen and the fast ones are written back at the stage end."""
    outs = []
    depth = len(model.blocks)
    for b in range(x.shape[0]):
        t = _embed(model, x[b : b + 1])
        p = t.shape[1] - 1
        k = int(p * keep)
        g, sel, stage_end = None, None, None
        for i, blk in enumerate(model.blocks):
            if i in starts:
                sel = sorted(range(p), key=lambda j: (-float(g[j]), j))[:k]
                full, stage_end = t, min([s for s in starts if s > i] + [depth])
                t = full[:, [0] + [1 + j for j in sel]]
            out, _, probs = _attention(blk.attn, blk.norm1(t))
            cls_row = probs[0, :, 0, 1:].sum(dim=0)
            if sel is None:
                g = cls_row
            else:
                g = g.clone()
                for q, j in enumerate(sel):
                    g[j] = (1 - alpha) * g[j] + alpha * cls_row[q]
            t = t + blk.ls1(out)
            t = t + blk.ls2(blk.mlp(blk.norm2(t)))
            if stage_end == i + 1:
                full = full.clone()
                full[:, [0] + [1 + j for j in sel]] = t
                t, sel = full, None
        outs.append(_head(model, t, None, model.num_prefix_tokens))
    return torch.cat(outs)


def agglomerative_one(metric, clusters: int, linkage: str) -> list[list[int]]:
    """Clusters (lists of token indices, ordered by their lowest index) of one sample by naive agglomerative
    clustering: repeatedly join the two clusters at the smallest linkage distance (1 - cosine)."""
    m = metric / metric.norm(dim=-1, keepdim=True)
    dist = (1 - m @ m.T).tolist()
    groups = [[t] for t in range(metric.shape[0])]
    pick = {"average": lambda ds: sum(ds) / len(ds), "complete": max, "single": min}[linkage]
    while len(groups) > clusters:
        best = None
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                d = pick([dist[s][t] for s in groups[a] for t in groups[b]])
                if best is None or d < best[0]:
                    best = (d, a, b)
        _, a, b = best
        groups[a] = sorted(groups[a] + groups.pop(b))
    return sorted(groups)


@torch.no_grad()
def atc_reference(model, x, keep: float, locations: list[int], linkage: str):
    """ATC: at the k-th location cluster the patch tokens into int(P·keep^(k+1)) clusters (key mean over heads,
    1 - cosine), each cluster -> size-weighted mean token, sizes add up; proportional attention on."""
    patches = None

    def reduce(i, b, xb, sb, probs, k, v):
        nonlocal patches
        patches = patches or xb.shape[0] - 1
        if i not in locations:
            return xb, sb
        count = int(patches * keep ** (locations.index(i) + 1))
        groups = agglomerative_one(k.mean(dim=0)[1:], count, linkage)
        rows, sizes = [xb[0]], [sb[0]]
        for g in groups:
            idx = [1 + t for t in g]
            s = sb[idx]
            rows.append((xb[idx] * s).sum(0) / s.sum())
            sizes.append(s.sum(0))
        return torch.stack(rows), torch.stack(sizes)

    return _blocks(model, x, reduce, prop_attn=True)


def turbo_reference(model, x, rs: list[int], alpha: float, min_tokens: int, prop_attn: bool = True):
    """Turbo (Ju et al., ECCV 2024) by its definition, one sample and one token at a time: after each block's
    attention, the even tokens but the class token are ranked by E = max_j cos(k_i, k_j) over the odd tokens j, minus
    30·α·(the class token's attention to i, mean over heads); the r highest merge into their most similar odd token
    (size-weighted mean), the others stay in order, then the odd tokens; no merging below ``min_tokens`` tokens."""

    def reduce(i, b, xb, sb, probs, k, v):
        return turbo_merge_one(xb, sb, k.mean(dim=0), probs[:, 0, :].mean(dim=0), rs[i], alpha, min_tokens)

    return _blocks(model, x, reduce, prop_attn)


def turbo_merge_one(x, size, metric, semantic, r: int, alpha: float, min_tokens: int):
    """One sample's Turbo merge: x (N, C), size (N, 1), metric (N, d) the keys averaged over heads, semantic (N,) the
    class token's attention (mean over heads); the class token is token 0."""
    n = x.shape[0]
    r = min(r, (n - 1) // 2)
    if r <= 0 or n < min_tokens:
        return x, size
    a_pos, b_pos = list(range(2, n, 2)), list(range(1, n, 2))  # (0: the class token)
    best, dest = {}, {}
    for p in a_pos:
        sims = [_cos(metric[p], metric[q]) for q in b_pos]
        j = max(range(len(sims)), key=lambda t: sims[t])
        best[p], dest[p] = sims[j] - 30 * alpha * float(semantic[p]), b_pos[j]
    merged = sorted(a_pos, key=lambda p: -best[p])[:r]
    tot_x = {q: size[q] * x[q] for q in b_pos}
    tot_s = {q: size[q].clone() for q in b_pos}
    for p in merged:
        tot_x[dest[p]] = tot_x[dest[p]] + size[p] * x[p]
        tot_s[dest[p]] = tot_s[dest[p]] + size[p]
    stay = [0] + [p for p in a_pos if p not in merged]
    xs = [x[p] for p in stay] + [tot_x[q] / tot_s[q] for q in b_pos]
    ss = [size[p] for p in stay] + [tot_s[q] for q in b_pos]
    return torch.stack(xs), torch.stack(ss)
