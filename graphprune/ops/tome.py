"""ToMe bipartite soft matching and size-weighted merge (Bolya et al., ICLR 2023).

``graphprune::tome_merge(x, size, metric, r, protected)`` merges ``r`` tokens of ``x``:

* tokens alternate into set A (even positions) and set B (odd positions);
* the similarity is the cosine between head-averaged attention keys (``metric``);
* the first ``protected`` tokens (class, distillation, register tokens) are never merged
  away (their A rows are -inf) and never receive merges (their B columns are -inf);
* every A token picks its most similar B token; the ``r`` A tokens with the highest
  similarity are merged into their match as a size-weighted average; sizes add up;
* with ``valid`` (B, N) given (padding), a valid token and a padded one never merge, and
  padding merges first (into padding), so which real tokens merge never depends on the padding;
  only where a row has no such pair left (the batch merges the same count in every row) does a
  padding token merge with a real one, never with a protected token;
* with ``penalty`` (B, N) given, each A token's similarities drop by its penalty: it ranks the A
  tokens (which merge) without changing where each goes (Turbo's semantic value);
* output order is ``[unmerged A, B]`` with the protected tokens interleaved back at the
  front in their original order (for one class token and one distillation token this is
  exactly the published ``[unm[0], B[0], unm[1:], B[1:]]``). With protected tokens the
  unmerged A tokens keep their positional order, as in the published code.
"""

from __future__ import annotations

import math

import torch

from graphprune.ops.maps import add_rows, identity_maps, take_rows


def tome_effective_r(n: int, r: int, protected: int) -> int:
    """The r actually applied to ``n`` tokens: at most half of the unprotected tokens. (``torch.sym_min``: a symbolic
    token count stays symbolic; Python's ``min`` would specialise it to the example's length.)"""
    return torch.sym_max(0, torch.sym_min(r, (n - protected) // 2))


def _interleave_prefix(unm: torch.Tensor, dst: torch.Tensor, protected: int) -> torch.Tensor:
    """[A0, B0, A1, B1, ...] for the protected prefix, then the remaining A, then the remaining B."""
    pa, pb = (protected + 1) // 2, protected // 2
    parts = []
    for i in range(pa):
        parts.append(unm[:, i : i + 1])
        if i < pb:
            parts.append(dst[:, i : i + 1])
    parts += [unm[:, pa:], dst[:, pb:]]
    return torch.cat(parts, dim=1)


def match(metric: torch.Tensor, r: int, protected: int, valid: torch.Tensor | None = None,
          penalty: torch.Tensor | None = None):
    """Bipartite soft matching. Returns (unm_idx, src_idx, dst_idx), each (B, k, 1)."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    if penalty is not None:
        scores = scores - penalty[:, ::2, None].to(scores.dtype)
    if valid is not None:  # padding merges first, into padding only; real tokens never merge with padding, unless
        # a row has no other pair left (the batch merges one count in every row): then below every pair but above the
        # protected tokens (-inf), which never merge
        va, vb = valid[:, ::2, None], valid[:, None, 1::2]
        scores = scores.masked_fill(va != vb, torch.finfo(scores.dtype).min).masked_fill(~va & ~vb, math.inf)
    pa, pb = (protected + 1) // 2, protected // 2
    if pa:
        scores[..., :pa, :] = -math.inf
    if pb:
        scores[..., :, :pb] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)[..., None]  # ties: lower index first, as ONNX TopK
    unm_idx = edge_idx[..., r:, :]
    src_idx = edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    if protected:
        unm_idx = unm_idx.sort(dim=1)[0]
    return unm_idx, src_idx, dst_idx


def token_maps(n: int, unm_idx, src_idx, dst_idx, protected: int):
    """Where the tokens went: ``assign`` (B, n) output index of every input token, ``rep`` (B, n_out) one input per output."""
    bsz = unm_idx.shape[0]
    nb = n // 2
    b_pos = (torch.arange(nb, device=unm_idx.device) * 2 + 1).expand(bsz, nb)[..., None]
    rep = _interleave_prefix(unm_idx * 2, b_pos, protected)[..., 0]
    positions = torch.arange(rep.shape[1], device=rep.device).expand_as(rep)
    assign = torch.zeros(bsz, n, dtype=torch.long, device=rep.device).scatter(1, rep, positions)
    assign = assign.scatter(1, src_idx[..., 0] * 2, assign.gather(1, dst_idx[..., 0] * 2 + 1))
    return assign, rep


@torch.library.custom_op("graphprune::tome_merge", mutates_args=())
def tome_merge(
    x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int, protected: int, valid: torch.Tensor | None = None,
    penalty: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (merged x, new sizes, assign (B, N) output index per input token, rep (B, n) an input per output)."""
    r = tome_effective_r(x.shape[1], r, protected)
    if r == 0:
        return x.clone(), size.clone(), *identity_maps(x)
    with torch.no_grad():
        unm_idx, src_idx, dst_idx = match(metric, r, protected, valid, penalty)
    assign, rep = token_maps(x.shape[1], unm_idx, src_idx, dst_idx, protected)
    src_pos = src_idx[..., 0] * 2  # A tokens sit at the even positions
    target = assign.gather(1, src_pos)  # where each merged token went: its destination's output
    xs = x * size
    merged = add_rows(take_rows(xs, rep), target, take_rows(xs, src_pos))
    new_size = add_rows(take_rows(size, rep), target, take_rows(size, src_pos))
    return merged / new_size, new_size, assign, rep


@tome_merge.register_fake
def _tome_merge_fake(x, size, metric, r, protected, valid=None, penalty=None):
    b, n_in = x.shape[0], x.shape[1]
    n = n_in - tome_effective_r(n_in, r, protected)
    long = dict(dtype=torch.long)
    return (x.new_empty((b, n, x.shape[2])), size.new_empty((b, n, 1)),
            x.new_empty((b, n_in), **long), x.new_empty((b, n), **long))
