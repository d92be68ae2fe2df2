"""Direct, per-sample implementations of the published algorithms, written from the papers'
definitions (REFERENCE.md), independent of graphprune's ops: loops over samples and tokens."""

from __future__ import annotations

import math

import torch


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
def tome_reference(model, x, rs: list[int], prop_attn: bool = True):
    """Published ToMe on a timm VisionTransformer (cls / distillation token aware)."""
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
            metric = k.mean(dim=1)
            s = size if size is not None else torch.ones(x.shape[0], x.shape[1], 1)
            outs = [tome_merge_one(x[i], s[i], metric[i], r, cls, dist) for i in range(x.shape[0])]
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
