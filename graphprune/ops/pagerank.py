"""PageRank on the attention graph: a token is important when important tokens attend to it.

Each head's attention matrix A (rows: queries, softmax over keys) is the adjacency matrix of a
graph on the tokens; the importance ``s`` is iterated as ``s ← Aᵀ s`` from a start vector
(Zero-TPrune's I-stage, :mod:`graphprune.recipes.zero_tprune`, weights the class token's start
and combines the heads). Plain tensor code: exports to ONNX as MatMuls.
"""

from __future__ import annotations

import torch


def attention_pagerank(probs, start, iterations: int, valid=None):
    """(B, H, N) importance per head from (B, H, N, N) attention probabilities, after ``iterations`` steps
    from ``start`` (N,); ``valid`` (B, N) zeroes padded queries before each step."""
    s = torch.zeros_like(probs[:, :, 0]) + start  # (B, H, N)
    keep = valid[:, None, :].to(probs.dtype) if valid is not None else None
    for _ in range(iterations):
        if keep is not None:
            s = s * keep
        s = (s[..., None, :] @ probs)[..., 0, :]  # s_j ← Σ_i s_i A_ij
    return s
