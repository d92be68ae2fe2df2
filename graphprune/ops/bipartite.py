"""Bipartite soft matching over a fixed split: ToMe's random and k-th partitions.

``bipartite_merge(x, size, metric, src, dst, r, protected, valid)`` merges tokens of set A
(positions ``src``) into set B (positions ``dst``), as ToMe does for its alternating split:

* each A token finds its most similar B token (cosine of ``metric``);
* the ``r`` A tokens with the most similar matches merge into them (size-weighted average,
  sizes add up); with ``r = len(src)`` every A token merges, which is ToMe's published
  ``random_bipartite_soft_matching`` (A = r random tokens) and ``kth_bipartite_soft_matching``
  (B = every k-th token);
* the first ``protected`` tokens are in neither set and stay first;
* with ``valid`` (padding), a real token and a padded one never merge and padding merges first;
  a token with no B token of its kind is dropped (``assign = -1``).

Output order: ``[protected, unmerged A (in src order), B (in dst order)]``. The split is a
constant of the graph (``src``/``dst`` are Python lists), so this is plain tensor code that
torch.export and the ONNX exporter handle without a custom lowering.
"""

from __future__ import annotations

import math
import random

import torch

from graphprune.ops.maps import merge_by_assign, prefix_index


def kth_split(n: int, protected: int, k: int) -> tuple[list[int], list[int]]:
    """B = every k-th unprotected token (positions k-1, 2k-1, ... after the prefix), A = the others."""
    tokens = range(protected, n)
    dst = [t for t in tokens if (t - protected) % k == k - 1]
    return [t for t in tokens if t not in set(dst)], dst


def random_split(n: int, protected: int, r: int, seed: int) -> tuple[list[int], list[int]]:
    """A = ``r`` unprotected tokens drawn at random, B = the rest in random order (one draw per call)."""
    order = list(range(protected, n))
    random.Random(seed).shuffle(order)
    return order[:r], order[r:]


def bipartite_merge(x, size, metric, src: list[int], dst: list[int], r: int, protected: int, valid=None):
    """Returns (x, size, assign, rep) with ``protected + len(src) - r + len(dst)`` tokens."""
    na = len(src)
    src_t = x.new_tensor(src, dtype=torch.long)  # graph constants (a method call, so FX tracing records it)
    dst_t = x.new_tensor(dst, dtype=torch.long)
    m = metric / metric.norm(dim=-1, keepdim=True)
    scores = m[:, src_t] @ m[:, dst_t].transpose(1, 2)  # (B, |A|, |B|)
    if valid is not None:
        va, vb = valid[:, src_t, None], valid[:, None, dst_t]
        scores = scores.masked_fill(va != vb, -math.inf).masked_fill(~va & ~vb, math.inf)
    best, match = scores.max(dim=-1)  # (B, |A|)
    order = best.argsort(dim=-1, descending=True, stable=True)  # ties: lower A index first
    merged, kept = order[:, :r], order[:, r:].sort(dim=-1)[0]  # unmerged A keep their src order
    n_out = protected + na - r + len(dst)
    long = torch.long
    head = prefix_index(x, protected)
    rep = torch.cat([head, src_t[kept], torch.zeros_like(scores[:, 0], dtype=long) + dst_t], dim=1)  # an input per output
    # output slot of every input token: its own slot if it stays, its match's slot if it merges
    slots = torch.ones_like(rep).cumsum(1) - 1
    assign = torch.zeros_like(x[..., 0], dtype=long).scatter(1, rep, slots)
    host = protected + na - r + match.gather(1, merged)  # (B, r) slot of the B token each merged A joins
    # a token with no B token of its kind (padding when all of B is real) is dropped, not merged across
    host = torch.where(best.gather(1, merged) > -math.inf, host, torch.full_like(host, -1))
    assign = assign.scatter(1, src_t[merged], host)
    return (*merge_by_assign(x, size, assign, n_out), assign, rep)
