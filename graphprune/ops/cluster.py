"""Agglomerative token clustering (ATC, Haurum et al., ECCV 2024), batched and exportable.

``agglomerative_merge(x, size, metric, clusters, protected, n, linkage, valid)`` clusters the
unprotected tokens the way the paper does with scikit-learn's ``AgglomerativeClustering``
(precomputed distance ``1 − cosine`` of ``metric``, ``average``/``complete``/``single``
linkage), then merges every cluster into one token (size-weighted mean, sizes add up).

The official code runs scikit-learn per image on the CPU. Here the same greedy algorithm runs
for the whole batch inside the graph: ``n − protected − clusters`` steps, each merging the
closest pair of clusters (the first in row-major order on ties) and updating the distances
with the Lance-Williams rule of the linkage (average: weighted by cluster cardinality). For
these three linkages this is the exact agglomerative clustering, so the clusters equal
scikit-learn's up to ties between equal distances; only their order differs (here: by the
lowest token index in each cluster). The step count is static, so the loop unrolls into the
graph and exports to ONNX (ArgMin and index updates) without a custom lowering.

With ``valid`` (padding), padding clusters with padding first and never with real tokens
while another pair is left.
"""

from __future__ import annotations

import torch

from graphprune.ops.maps import merge_by_assign, prefix_index

LINKAGES = ("average", "complete", "single")
FAR = 1e9  # distance of removed clusters and of a cluster to itself
APART = 1e4  # distance between a real token and padding


def agglomerative_merge(x, size, metric, clusters: int, protected: int, n: int, linkage: str = "average", valid=None):
    """Returns (x, size, assign, rep) with ``protected + clusters`` tokens."""
    if linkage not in LINKAGES:
        raise ValueError(f"linkage must be one of {LINKAGES}, got {linkage!r}")
    p = n - protected
    long = torch.long
    m = metric[:, protected:]
    m = m / m.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    d = 1 - m @ m.transpose(1, 2)  # (B, p, p)
    if valid is not None:
        v = valid[:, protected:]
        d = torch.where(v[:, :, None] != v[:, None, :], torch.full_like(d, APART), d)
        d = torch.where(~v[:, :, None] & ~v[:, None, :], torch.full_like(d, -APART), d)
    eye = x.new_ones(p).diag().bool()
    d = torch.where(eye, torch.full_like(d, FAR), d)
    tokens = torch.zeros_like(m[..., 0], dtype=long) + x.new_tensor(list(range(p)), dtype=long)  # (B, p)
    label = tokens  # the root of each token's cluster
    count = torch.ones_like(m[..., 0])
    rows = torch.ones_like(tokens[:, 0]).cumsum(0) - 1  # (B,) sample index
    for _ in range(p - clusters):
        pair = d.flatten(1).argmin(dim=1)
        i, j = pair // p, pair % p
        di, dj = d[rows, i], d[rows, j]  # (B, p)
        ci, cj = count[rows, i][:, None], count[rows, j][:, None]
        if linkage == "average":
            new = (ci * di + cj * dj) / (ci + cj)
        elif linkage == "complete":
            new = torch.maximum(di, dj)
        else:
            new = torch.minimum(di, dj)
        far = torch.full_like(new, FAR)
        cols = d.transpose(1, 2)  # a view: writing a column of the symmetric matrix
        d.index_put_((rows, i), new)
        cols.index_put_((rows, i), new)
        d.index_put_((rows, j), far)
        cols.index_put_((rows, j), far)
        d.index_put_((rows, i, i), far[:, 0])
        count.index_put_((rows, i), (ci + cj)[:, 0])
        count.index_put_((rows, j), torch.zeros_like(ci[:, 0]))
        label = torch.where(label == j[:, None], i[:, None], label)
    alive = count > 0  # exactly `clusters` roots per sample
    slot = alive.to(long).cumsum(dim=1) - 1  # output slot of each root, by index
    roots = alive.to(x.dtype).argsort(dim=1, descending=True, stable=True)[:, :clusters]
    head = prefix_index(x, protected)
    assign = torch.cat([head, slot.gather(1, label) + protected], dim=1)
    rep = torch.cat([head, roots + protected], dim=1)
    return (*merge_by_assign(x, size, assign, protected + clusters), assign, rep)
