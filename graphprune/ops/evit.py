"""EViT token reorganisation (Liang et al., ICLR 2022).

``graphprune::evit_select(x, score, keep, protected)``: ``score`` is the class token's
attention (after softmax, averaged over heads) to every token, shape (B, N). Of the
non-protected tokens, the ``ceil(keep * (N - protected))`` with the highest score are kept
(in descending score order, as ``topk`` returns them); the rest are fused into one extra
token ``sum(score_i * x_i)`` (not renormalised). Output: ``[protected..., kept..., fused]``.
When every token would be kept the input is returned unchanged (no fused token), as in the
published code.
"""

from __future__ import annotations

import math

import torch

from graphprune.ops.maps import identity_maps, take_rows


def evit_keep_count(n: int, keep: float, protected: int) -> int:
    """Tokens kept out of the ``n - protected`` candidates."""
    return math.ceil(keep * (n - protected))


def evit_out_tokens(n: int, keep: float, protected: int) -> int:
    k = evit_keep_count(n, keep, protected)
    return n if k >= n - protected else protected + k + 1


@torch.library.custom_op("graphprune::evit_select", mutates_args=())
def evit_select(x: torch.Tensor, score: torch.Tensor, keep: float, protected: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (tokens, assign (B, N) output index per input token, rep (B, n) an input per output token).

    Dropped tokens are assigned to the fused token; the fused token's representative is the
    dropped token with the highest score.
    """
    b, n, c = x.shape
    k = evit_keep_count(n, keep, protected)
    if k >= n - protected:
        return x.clone(), *identity_maps(x)
    rest, s = x[:, protected:], score[:, protected:]
    idx = s.argsort(dim=1, descending=True, stable=True)[:, :k]  # topk; ties keep the lower index (as ONNX TopK)
    kept = take_rows(rest, idx)
    dropped = torch.ones_like(s).scatter_(1, idx, 0.0)
    fused = (rest * (s * dropped).unsqueeze(-1)).sum(dim=1, keepdim=True)
    out = torch.cat([x[:, :protected], kept, fused], dim=1)
    head = torch.arange(protected, device=x.device).expand(b, protected)
    best_dropped = (s * dropped - (1 - dropped)).argmax(dim=1, keepdim=True)
    rep = torch.cat([head, idx + protected, best_dropped + protected], dim=1)
    assign = torch.full((b, n), protected + k, dtype=torch.long, device=x.device)
    assign[:, :protected] = head
    assign = assign.scatter(1, idx + protected, torch.arange(protected, protected + k, device=x.device).expand(b, k))
    return out, assign, rep


@evit_select.register_fake
def _evit_select_fake(x, score, keep, protected):
    b, n_in = x.shape[0], x.shape[1]
    n = evit_out_tokens(n_in, keep, protected)
    return x.new_empty((b, n, x.shape[2])), x.new_empty((b, n_in), dtype=torch.long), x.new_empty((b, n), dtype=torch.long)
