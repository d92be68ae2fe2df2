"""Token maps: every reduction op also says where the tokens went.

``assign`` (B, N_in): the output index each input token ends up in (merged and fused tokens
point at the token that absorbed them). ``rep`` (B, N_out): for each output token, one input
token it stands for. Composed across blocks they restore per-token outputs to the original
positions and make attention masks follow the tokens.
"""

from __future__ import annotations

import torch


def identity_maps(x: torch.Tensor):
    idx = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], x.shape[1]).clone()
    return idx, idx.clone()


def flat_rows(idx: torch.Tensor, length: int) -> torch.Tensor:
    """Row numbers, in a (B·length, C) view, of the token positions ``idx`` (B, k) in sequences of ``length`` (worked
    out once, it can be handed to :func:`take_rows` and :func:`add_rows` as ``flat``)."""
    return (idx + torch.arange(idx.shape[0], device=idx.device)[:, None] * length).reshape(-1)


def take_rows(t: torch.Tensor, idx: torch.Tensor, flat: torch.Tensor | None = None) -> torch.Tensor:
    """``t[b, idx[b, j]]``: the tokens of ``t`` (B, N, C) at ``idx`` (B, k), copied as rows (one index per token, not
    an element-wise gather over an index expanded across the channels: several times faster on a CPU). ``flat``:
    ``flat_rows(idx, N)``, if already worked out."""
    b, n, c = t.shape
    return t.reshape(b * n, c).index_select(0, flat_rows(idx, n) if flat is None else flat).view(b, -1, c)


def add_rows(base: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor, flat: torch.Tensor | None = None) -> torch.Tensor:
    """``base`` (B, n, C) with ``rows`` (B, k, C) added at the tokens ``idx`` (B, k) (repeats add up, in order);
    ``flat``: ``flat_rows(idx, n)``, if already worked out. Exported, element by element (see :func:`add_flat`)."""
    b, n, c = base.shape
    return add_flat(base.reshape(b * n, c), flat_rows(idx, n) if flat is None else flat, rows.reshape(-1, c)).view(b, n, c)


def add_flat(base: torch.Tensor, at: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``base`` (M, ...) with ``rows`` (k, ...) added at the rows ``at`` (k,) (repeats add up).

    Exported, it adds element by element: ``index_add`` exports as ScatterND with reduction "add", which ONNX
    Runtime's CPU kernel runs in parallel over the indices, losing additions to a repeated row with more than one
    thread (onnxruntime#18048); ScatterElements adds them in order."""
    if torch.compiler.is_exporting():
        return base.scatter_add(0, at.view(-1, *[1] * (rows.dim() - 1)).expand_as(rows), rows)
    return base.index_add(0, at, rows)


# The helpers below are plain tensor code that FX tracing can record (no Python ints read from shapes).


def prefix_index(x: torch.Tensor, protected: int) -> torch.Tensor:
    """(B, protected) long: 0, 1, ..., protected - 1 for every sample, the rep of the protected prefix."""
    return torch.zeros_like(x[:, :protected, 0], dtype=torch.long) + x.new_tensor(list(range(protected)), dtype=torch.long)


def merge_by_assign(x: torch.Tensor, size: torch.Tensor, assign: torch.Tensor, n_out: int):
    """Size-weighted mean of the tokens sharing an output slot; sizes add up. ``assign == -1``: left out.

    Returns (tokens (B, n_out, C), sizes (B, n_out, 1)).
    """
    c = x.shape[-1]
    both = torch.cat([x * size, size], dim=-1)
    into = torch.where(assign >= 0, assign, torch.full_like(assign, n_out))  # left out: a spare row
    total = torch.zeros_like(both[:, :1]).expand(-1, n_out + 1, -1).scatter_add(1, into[..., None].expand_as(both), both)
    new_size = total[:, :n_out, c:]
    return total[:, :n_out, :c] / new_size, new_size
