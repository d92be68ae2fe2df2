"""PiToMe: spectrum-preserving token merging (Tran et al., NeurIPS 2024).

``graphprune::pitome_merge(x, size, metric, r, protected, margin, all_pairs, valid)``:

* ``metric`` (head-mean keys) of the non-protected tokens is L2-normalised; each token's energy
  is ``E_i = mean_j ELU(cos_ij − margin)`` over all non-protected tokens j (itself included);
* tokens are ordered by energy, highest first (ties: lower index first);
* ``all_pairs=True`` (PiToMe's first layers): the ordered tokens alternate into A and B, every A
  token picks its most similar B token and the ``r`` best such edges merge (ToMe's rule);
* ``all_pairs=False``: only the ``2r`` highest-energy tokens are mergeable, alternating into A and
  B, and *all* ``r`` A tokens merge into their most similar B token; the rest are protected;
* merges are size-weighted averages, sizes add up; output ``[protected, kept A, B]``, each in
  energy order;
* with ``valid`` (padding), padded tokens have +inf energy, only merge with padding, and the
  energy of a real token only counts real tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from graphprune.ops.maps import add_rows, identity_maps, take_rows


def pitome_r(n: int, r: int, protected: int, all_pairs: bool) -> int:
    t = n - protected
    return max(0, min(r, t // 2))


def plan(metric, r: int, protected: int, margin: float, all_pairs: bool, valid=None):
    """(kept A, merged A, their hosts' index in B, all B) as token indices (B, k)."""
    m = metric[:, protected:]
    m = m / m.norm(dim=-1, keepdim=True)
    e = F.elu(m @ m.transpose(1, 2) - margin)
    if valid is not None:
        v = valid[:, protected:]
        e = ((e * v[:, None, :]).sum(-1) / v.sum(-1, keepdim=True).clamp(min=1)).masked_fill(~v, math.inf)
    else:
        e = e.mean(dim=-1)
    order = e.argsort(dim=1, descending=True, stable=True)
    pool = order if all_pairs else order[:, : 2 * r]
    a, b = pool[:, 0::2], pool[:, 1::2]
    scores = take_rows(m, a) @ take_rows(m, b).transpose(1, 2)
    if valid is not None:
        va, vb = v.gather(1, a)[:, :, None], v.gather(1, b)[:, None, :]
        scores = scores.masked_fill(va != vb, -math.inf).masked_fill(~va & ~vb, math.inf)
    best, host = scores.max(dim=-1)
    if all_pairs:
        edge = best.argsort(dim=1, descending=True, stable=True)
        src, kept_a = edge[:, :r], a.gather(1, edge[:, r:].sort(dim=1).values)  # kept A stay in energy order
    else:
        src, kept_a = torch.arange(a.shape[1], device=a.device).expand(a.shape[0], -1), order[:, 2 * r :]
    return kept_a + protected, a.gather(1, src) + protected, host.gather(1, src), b + protected


@torch.library.custom_op("graphprune::pitome_merge", mutates_args=())
def pitome_merge(
    x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int, protected: int, margin: float, all_pairs: bool,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    bsz, n, c = x.shape
    r = pitome_r(n, r, protected, all_pairs)
    if r == 0:
        return x.clone(), size.clone(), *identity_maps(x)
    with torch.no_grad():
        kept_a, src, host, b = plan(metric, r, protected, margin, all_pairs, valid)
    head = torch.arange(protected, device=x.device).expand(bsz, protected)
    rep = torch.cat([head, kept_a, b], dim=1)
    slot = host + protected + kept_a.shape[1]  # output slot of each merged token's host
    xs = x * size
    total = add_rows(take_rows(xs, rep), slot, take_rows(xs, src))
    new_size = add_rows(take_rows(size, rep), slot, take_rows(size, src))
    assign = torch.zeros(bsz, n, dtype=torch.long, device=x.device)
    assign = assign.scatter(1, rep, torch.arange(rep.shape[1], device=x.device).expand(bsz, -1)).scatter(1, src, slot)
    return total / new_size, new_size, assign, rep


@pitome_merge.register_fake
def _pitome_merge_fake(x, size, metric, r, protected, margin, all_pairs, valid=None):
    b, n = x.shape[0], x.shape[1]
    m = n - pitome_r(n, r, protected, all_pairs)
    long = dict(dtype=torch.long)
    return (x.new_empty((b, m, x.shape[2])), size.new_empty((b, m, 1)), x.new_empty((b, n), **long), x.new_empty((b, m), **long))
