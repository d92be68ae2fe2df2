"""Zero-TPrune's token importance: weighted PageRank on the attention graph (Wang et al., CVPR 2024).

Each head's attention matrix A (rows: queries, softmax over keys) is the adjacency matrix of
a graph on the tokens. A token is important when important tokens attend to it:
``s ← Aᵀ s``, iterated from a start where the class token weighs √N times the others. The
heads are combined by their root mean square (the paper's "emphasizing informative region"),
over the heads whose score variance lies in ``[v_min, v_max]`` (its variance-based head
filter; measured here on N·s, whose mean is 1, and all heads when none passes).

Plain tensor code: exports to ONNX as MatMuls.
"""

from __future__ import annotations

import math

import torch


def weighted_pagerank(probs, n: int, iterations: int, has_cls: bool, valid=None, v_min: float = 0.01, v_max: float = 0.7):
    """(B, N) importance from (B, H, N, N) attention probabilities over ``n`` tokens; ``valid`` (B, N) zeroes
    padded queries."""
    start = [math.sqrt(n) if (has_cls and i == 0) else 1.0 for i in range(n)]
    s = probs.new_tensor(start) / sum(start)
    s = torch.zeros_like(probs[:, :, 0]) + s  # (B, H, N)
    keep = valid[:, None, :].to(probs.dtype) if valid is not None else None
    for _ in range(iterations):
        if keep is not None:
            s = s * keep
        s = (s[..., None, :] @ probs)[..., 0, :]  # s_j ← Σ_i s_i A_ij
    var = (s * n).var(dim=-1, unbiased=False)  # (B, H)
    ok = ((var >= v_min) & (var <= v_max)).to(s.dtype)
    ok = torch.where(ok.sum(dim=1, keepdim=True) > 0, ok, torch.ones_like(ok))
    return ((s * s * ok[..., None]).sum(dim=1) / ok.sum(dim=1, keepdim=True)).sqrt()


def similar_half(importance, metric, n: int, drop: int, protected: int, valid=None):
    """Zero-TPrune's S-stage: ``(B, N)`` bool, True for the ``drop`` tokens removed as near-duplicates.

    The unprotected tokens are split by importance: the less important half A, the more
    important half B. Each A token's similarity is its best cosine to B (``metric``: the keys);
    the ``drop`` most similar A tokens go. Padding (``valid`` False) goes first.
    """
    p = n - protected
    order = importance[:, protected:].argsort(dim=1, descending=True, stable=True) + protected
    b_idx, a_idx = order[:, : p - p // 2], order[:, p - p // 2 :]
    m = metric / metric.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    take = lambda idx: m.gather(1, idx[..., None].expand(-1, -1, m.shape[-1]))  # noqa: E731
    best = (take(a_idx) @ take(b_idx).transpose(1, 2)).amax(dim=-1)  # (B, |A|)
    if valid is not None:
        best = torch.where(valid.gather(1, a_idx), best, torch.full_like(best, math.inf))
    chosen = a_idx.gather(1, best.argsort(dim=1, descending=True, stable=True)[:, :drop])
    return torch.zeros_like(importance, dtype=torch.bool).scatter(1, chosen, torch.ones_like(chosen, dtype=torch.bool))
