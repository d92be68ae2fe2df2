"""The prompt-rows stage: at a layer boundary a policy picks which token rows go on.

Every forward starts with its tokens as the rows of layer 0, all of them *selected*. After a
layer's attention a policy that prunes rows (:meth:`CachePolicy.rows`) names the tokens that
stop there; those rows leave the hidden states, and the tokens are deselected for the layers
above in this forward (left out of their attention; a token that an earlier forward evicted
from a lower layer's cache is not stopped: each layer evicts from its own cache). The hooks below carry the rows between
layers: their positions (so the attention mask follows) and rotary embeddings, which are real
tokens (padding rows fill up a batch whose sequences keep different numbers) and which this
forward brought in. The kept rows keep their original positions. Logits come out for the
tokens that reached the top (the last token always does).

A policy that *revives* (LazyLLM) keeps the hidden states of the rows it stops in an Aux store
of that layer; a later forward that selects such a token again recomputes it from the first
layer where it has no keys and values, from the Aux store of the layer below. No token is
computed twice at a layer.

PyramidInfer and LazyLLM run on this stage.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import cached_property

import torch

from graphprune.ops.rope import apply as apply_rope


@dataclass
class Rows:
    """The rows the current layer computes, and which tokens a layer below stopped in this forward."""

    pos: torch.Tensor  # (B, R) position of each row
    real: torch.Tensor  # (B, R) bool: a token (not padding)
    new: torch.Tensor  # (B, R) bool: a token this forward brought in (not revived)
    n_new: int  # tokens this forward brought in
    ids: torch.Tensor  # (B, R) token id of each row (-1: unknown, a revived row or a call without ids)
    rope: torch.Tensor  # (B, R, K, 2, D) each row's rotary embedding (cos, sin) of each of the model's K kinds (Gemma 3:
    # local and global layers); any kind of RoPE (multimodal rotates by 3-D positions, which ``pos`` does not hold)
    block: torch.Tensor  # (B, R) each row's attention block (see Call.blocks; -1: causal)
    log_size: torch.Tensor  # (B, R) log of how many tokens each row stands for (0: itself; merged rows more)
    stopped: torch.Tensor | None = None  # (B, T) bool by position: tokens a layer stopped (None: none yet)
    drop: torch.Tensor | None = None  # (B, R) bool: rows the current layer stopped
    moved: bool = False  # the rows differ from the forward's input rows
    limit: int | None = None  # positions this forward can name when known in advance (a static export); None: read

    PER_ROW = ("pos", "new", "ids", "block", "log_size", "rope")  # the per-row fields besides ``real``

    def keep(self, keep: torch.Tensor, hidden: torch.Tensor, count: int | None = None) -> torch.Tensor:
        """Only the rows ``keep`` (B, R) go on, by position (:func:`compact`; ``count`` rows, padding included, where
        fixed in advance): every per-row field and ``hidden`` (B, R, C) follow; returns the hidden rows."""
        self.real, *fields, hidden = compact(keep, *(getattr(self, f) for f in self.PER_ROW), hidden, count=count)
        for name, t in zip(self.PER_ROW, fields):
            setattr(self, name, t)
        self.moved = True
        return hidden

    @cached_property
    def span(self) -> int:
        """Positions this forward can name: up to its newest token's (every layer holds that one)."""
        return self.limit if self.limit is not None else int(self.pos.max()) + 1

    def deselect(self, slot_pos: torch.Tensor, stop: torch.Tensor) -> None:
        """The tokens at ``slot_pos`` (B, N) where ``stop`` holds stop here: the layers above leave them out, for
        the rest of this forward."""
        hit = by_position(slot_pos, stop, self.span)
        self.stopped = hit if self.stopped is None else self.stopped | hit

    def visible(self, slot_pos: torch.Tensor) -> torch.Tensor | None:
        """(B, N) bool: which of the tokens at ``slot_pos`` no layer below stopped; None: all. (A token that an
        earlier step evicted from a lower layer's cache is still seen where it is cached: layers evict on their
        own.)"""
        if self.stopped is None:
            return None
        return ~self.stopped.gather(1, slot_pos.clamp(0, self.span - 1))


@dataclass
class Aux:
    """Hidden states of the rows a layer stopped, for revival: ``hidden`` (B, A, C), ``pos`` (B, A) (-1: padding),
    and their rotary embeddings ``rope`` (B, A, K, 2, D)."""

    hidden: torch.Tensor
    pos: torch.Tensor
    rope: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.hidden, self.rope))


def by_position(pos: torch.Tensor, flag: torch.Tensor, size: int) -> torch.Tensor:
    """(B, size) bool: the positions of ``pos`` (B, N) where ``flag`` holds."""
    out = torch.zeros(pos.shape[0], size, dtype=torch.long, device=pos.device)
    return out.scatter_add_(1, pos.clamp(0, size - 1), flag.long()) > 0


def is_media(ids: torch.Tensor, media: torch.Tensor) -> torch.Tensor:
    """Which of ``ids`` are among the few ``media`` placeholder ids (``torch.isin``, written as a comparison that
    exports to ONNX)."""
    return (ids[..., None] == media.to(ids.device)).any(-1)


def compact(keep: torch.Tensor, pos: torch.Tensor, *rows: torch.Tensor, count: int | None = None) -> tuple[torch.Tensor, ...]:
    """Reorder rows by position, the ones not kept first as padding, and drop the padding no sequence needs (or keep
    ``count`` rows, where that count is fixed in advance: no sequence keeps more).

    Returns ``keep``, ``pos`` and ``rows`` gathered in that order."""
    r = keep.shape[-1]
    key = torch.where(keep, pos, -1) * r + torch.arange(r, device=pos.device)  # (distinct keys: any sort is stable)
    count = max(int(keep.sum(-1).max()), 1) if count is None else count
    order = key.argsort(dim=-1)[:, -count:]
    return tuple(_gather(t, order) for t in (keep, pos, *rows))


def _gather(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    idx = order.reshape(*order.shape, *([1] * (t.dim() - 2))).expand(*order.shape, *t.shape[2:])
    return t.gather(1, idx)


def stash(layer, which: torch.Tensor, rows: Rows, hidden: torch.Tensor) -> None:
    """Append the hidden states of rows ``which`` (B, R) to ``layer``'s Aux store."""
    if not bool(which.any()):
        return
    real, pos, hidden, rope = compact(which, rows.pos, hidden, rows.rope)
    pos = pos.masked_fill(~real, -1)
    if layer.aux is not None:
        old = layer.aux
        hidden, pos, rope = (torch.cat([a, b], 1) for a, b in zip((old.hidden, old.pos, old.rope), (hidden, pos, rope)))
    layer.aux = Aux(hidden, pos, rope)


def revive(rows: Rows, layer, below, first, hidden: torch.Tensor) -> torch.Tensor:
    """Bring the selected tokens (the ones the ``first`` layer holds that no layer below stopped) that have no keys
    and values at ``layer`` back from the Aux store of the layer below; returns the hidden rows (as they were when
    none revive)."""
    t = rows.span
    wanted = by_position(first.storage.pos[:, 0], first.storage.valid[:, 0], t)
    if rows.stopped is not None:
        wanted &= ~rows.stopped
    st = layer.storage
    if st.valid is not None:
        wanted &= ~by_position(st.pos[:, 0], st.valid[:, 0], t)
    wanted &= ~by_position(rows.pos, rows.real, t)
    if not bool(wanted.any()):
        return hidden
    k = int(wanted.sum(-1).max())
    pos = wanted.long().argsort(dim=-1, descending=True, stable=True)[:, :k]  # revived positions first, ascending
    real = wanted.gather(1, pos)
    entry = torch.full((wanted.shape[0], t + 1), -1, dtype=torch.long, device=pos.device)
    if below.aux is not None:
        stored = below.aux.pos
        entry.scatter_(1, stored.masked_fill(stored < 0, t), torch.arange(stored.shape[1], device=pos.device).expand_as(stored))
    found = entry.gather(1, pos)
    if bool((real & (found < 0)).any()):
        raise RuntimeError(f"graphprune: a selected token has neither keys and values nor an Aux entry at layer "
                           f"{layer.layer_idx}")
    back, rope = (_gather(t, found.clamp(min=0)) for t in (below.aux.hidden, below.aux.rope))
    revived = {"pos": pos, "new": torch.zeros_like(real), "ids": torch.full_like(pos, -1),
               "block": torch.full_like(pos, -1), "log_size": torch.zeros(real.shape, device=pos.device), "rope": rope}
    for name in Rows.PER_ROW:  # the revived rows after this forward's, then all in order of position
        setattr(rows, name, torch.cat([getattr(rows, name), revived[name].to(getattr(rows, name).dtype)], 1))
    return rows.keep(torch.cat([rows.real, real], 1), torch.cat([hidden, back.to(hidden.dtype)], 1))


class LayerRows:
    """The prompt's rows entering decoder layer ``layer`` (of ``n_layers``), for a policy that merges them
    (:meth:`CachePolicy.merge_rows`): ``hidden`` (B, R, C), ``pos``, ``real`` (B, R), ``visual`` (B, R) bool (image
    and video tokens; None: a text-only model); :meth:`queries_keys` and :meth:`rotate` apply this layer's own
    projections and rotary embedding (read only)."""

    def __init__(self, layer: int, n_layers: int, hidden: torch.Tensor, rows: Rows, media: torch.Tensor | None, module,
                 cos: torch.Tensor, sin: torch.Tensor):
        self.layer, self.n_layers, self.hidden = layer, n_layers, hidden
        self.pos, self.real = rows.pos, rows.real
        self.visual = None if media is None else is_media(rows.ids, media)
        self._module, self._cos, self._sin = module, cos, sin

    def queries_keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's queries (B, Hq, R, D) and keys (B, Hkv, R, D) of the rows, before the rotary embedding: its
        projections of its input norm of ``hidden`` (and its q/k norms, where the model has them)."""
        attn = self._module.self_attn
        x = self._module.input_layernorm(self.hidden)
        b, r = x.shape[:2]
        q = attn.q_proj(x).view(b, r, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, r, -1, attn.head_dim).transpose(1, 2)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        return q, k

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Queries or keys (B, H, R, D) rotated as this layer rotates them."""
        return apply_rope(x, self._cos[:, None].to(x.dtype), self._sin[:, None].to(x.dtype))


def _replace(output, hidden: torch.Tensor):
    """A decoder layer's output with other hidden states."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def install(model, revives: bool, policy) -> None:
    """Hooks on the decoder layers of ``model`` (graphprune's own copy) that carry the rows between layers; ``policy``
    merges rows (:meth:`CachePolicy.merge_rows`) where it defines that."""
    from graphprune.kv.cache import cache_in, real_tokens

    decoder = model.get_decoder()
    layers, rotary = decoder.layers, decoder.rotary_emb
    # the model's kinds of rotary embedding: one, or one per layer type (Gemma 3 rotates local and global layers apart)
    types = getattr(decoder.config, "layer_types", None)
    kinds = sorted(set(types)) if types and "layer_type" in inspect.signature(rotary.forward).parameters else [None]
    kind = [0 if kinds == [None] else kinds.index(t) for t in (types or [None] * len(layers))]

    def embeddings(hidden, kwargs, b, n) -> torch.Tensor:
        """(B, n, K, 2, D): the forward's tokens' rotary embeddings of every kind."""
        if kinds == [None]:
            pairs = [kwargs["position_embeddings"]]
        else:
            pairs = [rotary(hidden, kwargs["position_ids"], t) for t in kinds]
        return torch.stack([torch.stack([t.expand(b, n, t.shape[-1]) for t in pair], 2) for pair in pairs], 2)

    last = len(layers) - 1
    merges = policy.merges_rows

    def before(module, args, kwargs):
        cache = cache_in(kwargs)
        if cache is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        idx = module.self_attn.layer_idx
        if idx == 0:  # a new forward: its tokens are the rows
            b, n = hidden.shape[:2]
            pos = kwargs["position_ids"][..., -n:].expand(b, n)
            real = real_tokens(kwargs.get("attention_mask"), b, n, hidden.device) if cache.layers[0].prompt_len is None \
                else torch.ones(b, n, dtype=torch.bool, device=hidden.device)
            ids = cache.call.input_ids
            ids = torch.full_like(pos, -1) if ids is None else ids[:, -n:].to(pos.device).expand(b, n)
            blocks = cache.call.blocks
            blocks = torch.full_like(pos, -1) if blocks is None else blocks[:, -n:].to(pos.device).expand(b, n)
            cache.call.rows = Rows(pos, real, torch.ones_like(real), n, ids, embeddings(hidden, kwargs, b, n), blocks,
                                   torch.zeros(b, n, device=hidden.device))
            if cache.call.rows_plan is not None:  # a static export's prompt pass: its positions count from 0
                cache.call.rows.limit = n
        rows = cache.call.rows
        if revives and idx > 0:
            hidden = revive(rows, cache.layers[idx], cache.layers[idx - 1], cache.layers[0], hidden)
        if merges and cache.layers[idx].prompt_len is None:  # (rows merge in the prompt pass)
            rope = rows.rope[:, :, kind[idx]]
            merged = policy.merge_rows(LayerRows(idx, len(layers), hidden, rows, cache.call.media, module,
                                                 rope[:, :, 0], rope[:, :, 1]))
            if merged is not None:  # the merged rows go on with their new hidden states, the others stop here
                rows.deselect(rows.pos, rows.real & ~merged.keep)
                rows.log_size = merged.log_size.float()
                hidden = rows.keep(rows.real & merged.keep, merged.hidden.to(hidden.dtype))
        if not rows.moved:
            return None
        kwargs = dict(kwargs)  # the rows are no longer the model's: their own positions; the layer masks by position
        kwargs.pop("hidden_states", None)
        rope = rows.rope[:, :, kind[idx]]
        kwargs["position_embeddings"] = (rope[:, :, 0], rope[:, :, 1])
        kwargs["position_ids"] = rows.pos
        kwargs["attention_mask"] = None
        return (hidden, *args[1:]), kwargs

    def after(module, args, kwargs, output):
        cache = cache_in(kwargs)
        rows = None if cache is None else cache.call.rows
        if rows is None:
            return None
        idx = module.self_attn.layer_idx
        hidden = output[0] if isinstance(output, tuple) else output
        drop, rows.drop = rows.drop, None
        plan = cache.call.rows_plan
        if plan is not None:  # a static export: rows leave where the policy stops some, as many as planned
            return None if drop is None else _replace(output, rows.keep(rows.real & ~drop, hidden, plan[idx]))
        keep = rows.real if drop is None else rows.real & ~drop
        if revives and drop is not None and idx < last:  # the Aux store of this layer keeps their hidden states
            stash(cache.layers[idx], drop & rows.real, rows, hidden)
        if idx == last:  # only this forward's tokens come out (revived ones were computed for their keys and values)
            keep = keep & rows.new
        if bool(keep.all()):
            return None
        return _replace(output, rows.keep(keep, hidden))

    for layer in layers:
        layer.register_forward_pre_hook(before, with_kwargs=True)
        layer.register_forward_hook(after, with_kwargs=True)
