"""Score-ranked token selection: prune, and merge into the nearest kept token.

Both ops rank the non-protected tokens by ``score`` (B, N), highest first; ties keep the
lower index (a stable sort, as ONNX ``TopK``). The first ``protected`` tokens stay in place.

``graphprune::prune(x, score, keep, protected)``: keep the ``keep`` best-ranked tokens (in
rank order) and drop the rest. Dropped tokens get ``assign = -1``: a restored output shows
them as they were when they were dropped.

``graphprune::merge_nearest(x, size, metric, score, keep, protected, valid, mode)``: the
``keep`` best-ranked tokens stay (in rank order); every other token is merged into the kept
token whose ``metric`` is most similar (cosine, argmax). ``mode`` is the merge rule:

* ``"size"``: size-weighted average, sizes add up (ToMe's rule);
* ``"squeeze"``: host i becomes ``(e·x_i + Σ_j exp(cos_ij)·x_j) / (e + Σ_j exp(cos_ij))``
  (TPS: a softmax over the host's self-similarity 1 and its guests' similarities); sizes add up;
* ``"mean"``: plain mean of the host and its guests, and the host's size grows by
  ``Σ_j cos_ij·size_j`` (DiffRate).

With ``valid`` (padding), only real
tokens merge, and only into real kept tokens; padded tokens that are not kept are dropped
(``assign = -1``). Padding is never merged because padded tokens are often identical (RoBERTa
gives them all one position), so their similarities tie up to rounding and the chosen host
would depend on the runtime.
"""

from __future__ import annotations

import math

import torch

from graphprune.ops.maps import add_rows, identity_maps, take_rows


def rank(score: torch.Tensor, protected: int) -> torch.Tensor:
    """Indices (B, N - protected) of the non-protected tokens, best first; ties: lower index first."""
    return score[:, protected:].argsort(dim=1, descending=True, stable=True) + protected


def _head(x: torch.Tensor, protected: int) -> torch.Tensor:
    return torch.arange(protected, device=x.device).expand(x.shape[0], protected)


@torch.library.custom_op("graphprune::prune", mutates_args=())
def prune(x: torch.Tensor, score: torch.Tensor, keep: int, protected: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, n, _ = x.shape
    if keep >= n - protected:
        return x.clone(), *identity_maps(x)
    kept = rank(score, protected)[:, :keep]
    rep = torch.cat([_head(x, protected), kept], dim=1)
    assign = torch.full((b, n), -1, dtype=torch.long, device=x.device)
    assign = assign.scatter(1, rep, torch.arange(protected + keep, device=x.device).expand(b, -1))
    return take_rows(x, rep), assign, rep


@prune.register_fake
def _prune_fake(x, score, keep, protected):
    b, n = x.shape[0], x.shape[1]
    m = n if keep >= n - protected else protected + keep
    return x.new_empty((b, m, x.shape[2])), x.new_empty((b, n), dtype=torch.long), x.new_empty((b, m), dtype=torch.long)


def nearest(metric: torch.Tensor, rep: torch.Tensor, rest: torch.Tensor, valid: torch.Tensor | None, protected: int) -> torch.Tensor:
    """For each token in ``rest``, (its best cosine similarity, the index among the non-protected kept tokens)."""
    m = metric / metric.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    kept = rep[:, protected:]
    sim = take_rows(m, rest) @ take_rows(m, kept).transpose(1, 2)  # (B, n_rest, n_kept)
    if valid is not None:
        both = valid.gather(1, rest)[:, :, None] & valid.gather(1, kept)[:, None, :]
        sim = sim.masked_fill(~both, -math.inf)
    return sim.max(dim=-1)


MODES = ("size", "squeeze", "mean")


@torch.library.custom_op("graphprune::merge_nearest", mutates_args=())
def merge_nearest(
    x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, score: torch.Tensor, keep: int, protected: int,
    valid: torch.Tensor | None = None, mode: str = "size",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    b, n, c = x.shape
    if keep >= n - protected:
        return x.clone(), size.clone(), *identity_maps(x)
    order = rank(score, protected)
    rep = torch.cat([_head(x, protected), order[:, :keep]], dim=1)
    rest = order[:, keep:]
    with torch.no_grad():
        sim, host = nearest(metric, rep, rest, valid, protected)
    host = host[..., None] + protected  # output slot of the host, (B, n_rest, 1)
    ok = sim.isfinite()[..., None].to(x.dtype)  # padding (no host): dropped
    sim = sim.nan_to_num(0.0, posinf=0.0, neginf=0.0)[..., None]
    guest_size = take_rows(size, rest) * ok
    into = lambda base, t: add_rows(base, host[..., 0], t)  # noqa: E731
    if mode == "size":
        new_size = into(take_rows(size, rep), guest_size)
        xs = x * size
        out = into(take_rows(xs, rep), ok * take_rows(xs, rest)) / new_size
    elif mode == "squeeze":
        w = sim.exp() * ok
        out = into(math.e * take_rows(x, rep), w * take_rows(x, rest)) / into(torch.full_like(size[:, : rep.shape[1]], math.e), w)
        new_size = into(take_rows(size, rep), guest_size)
    elif mode == "mean":
        out = into(take_rows(x, rep), ok * take_rows(x, rest)) / into(torch.ones_like(size[:, : rep.shape[1]]), ok)
        new_size = into(take_rows(size, rep), sim * guest_size)
    else:
        raise ValueError(f"merge_nearest mode must be one of {MODES}, got {mode!r}")
    assign = torch.zeros(b, n, dtype=torch.long, device=x.device)
    hosted = torch.where(ok[..., 0] > 0, host[..., 0], -1)
    assign = assign.scatter(1, rep, torch.arange(rep.shape[1], device=x.device).expand(b, -1)).scatter(1, rest, hosted)
    return out, new_size, assign, rep


@merge_nearest.register_fake
def _merge_nearest_fake(x, size, metric, score, keep, protected, valid=None, mode="size"):
    b, n = x.shape[0], x.shape[1]
    m = n if keep >= n - protected else protected + keep
    long = dict(dtype=torch.long)
    return (x.new_empty((b, m, x.shape[2])), size.new_empty((b, m, 1)), x.new_empty((b, n), **long), x.new_empty((b, m), **long))
