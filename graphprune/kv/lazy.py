"""LazyLLM's dynamic token pruning: every forward computes only the tokens that matter to the next one.

In each forward (the prompt, then every decoding step) all tokens start *selected*. After
layer l the last token's attention (mean over heads) scores the selected tokens, and the
recipe's share of the lowest is deselected for the layers above. Deselected tokens are
left out of later layers' attention; the ones computed in this forward stop being computed.
Their hidden states go to the Aux Cache of layer l. A later forward may select a token
again: at the first layer where it has no keys and values yet it *revives*, its hidden state
coming from the Aux Cache of the layer below, so no token is computed twice at a layer.

The rows a layer computes are this forward's surviving new tokens plus the revived ones,
sorted by position (padding rows first), with their own positions. The hooks below carry
them between layers; :class:`LazyLayer` attends over the selected tokens and scores them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from graphprune.kv.cache import EvictingCache, EvictingLayer, _real_tokens


@dataclass
class Rows:
    """The rows the current layer computes, and which tokens are still selected in this forward."""

    pos: torch.Tensor  # (B, R) position of each row
    real: torch.Tensor  # (B, R) bool: a token (not padding)
    new: torch.Tensor  # (B, R) bool: a token this forward brought in (not revived)
    n_new: int  # tokens this forward brought in
    selected: torch.Tensor | None = None  # (B, T) bool by position; set by layer 0
    prune: torch.Tensor | None = None  # (B, R) bool: rows the current layer deselected
    moved: bool = False  # the rows differ from the forward's input rows


def _by_position(pos: torch.Tensor, flag: torch.Tensor, size: int) -> torch.Tensor:
    """(B, size) bool: the positions of ``pos`` (B, N) where ``flag`` holds."""
    out = torch.zeros(pos.shape[0], size, dtype=torch.long, device=pos.device)
    return out.scatter_add_(1, pos.clamp(0, size - 1), flag.long()) > 0


def _compact(keep: torch.Tensor, pos: torch.Tensor, *rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Reorder rows by position, the ones not kept first as padding, and drop the padding no sequence needs.

    Returns the order (B, R') and ``keep``, ``pos`` and ``rows`` gathered by it."""
    key = torch.where(keep, pos, -1)
    order = key.argsort(dim=-1, stable=True)[:, -max(int(keep.sum(-1).max()), 1):]
    return (order, *(_gather(t, order) for t in (keep, pos, *rows)))


def _gather(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    idx = order.reshape(*order.shape, *([1] * (t.dim() - 2))).expand(*order.shape, *t.shape[2:])
    return t.gather(1, idx)


class LazyLayer(EvictingLayer):
    """A cache layer that never evicts: it holds keys and values of the tokens computed at this layer (in the
    order they were computed, each with its position), and the Aux Cache of the hidden states pruned after it
    (``hidden`` (B, A, C) and ``hidden_pos`` (B, A), position -1 for padding)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hidden: torch.Tensor | None = None
        self.hidden_pos: torch.Tensor | None = None

    def update(self, key_states, value_states, *args, **kwargs):
        out = super().update(key_states, value_states, *args, **kwargs)
        self.seen += self.call.lazy.n_new - key_states.shape[-2]  # revived rows are not new tokens
        return out

    @property
    def nbytes(self) -> int:
        hidden = self.hidden
        return self.storage.nbytes + (0 if hidden is None else hidden.numel() * hidden.element_size())

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("lazyllm does not support beam search")

    batch_repeat_interleave = batch_select_indices = reorder_cache

    def attend(self, module, query, attention_mask, scaling, dropout, kwargs):
        rows: Rows = self.call.lazy
        r = query.shape[2]
        if self.prompt_len is None:
            self.prompt_len = r
        self.storage.describe(rows.real, rows.pos)
        keys, values, valid, pos = self.storage.keys, self.storage.values, self.storage.valid, self.storage.pos
        b, hkv, n = valid.shape
        slot_pos, valid = pos[:, 0], valid[:, 0]
        if rows.selected is None:  # layer 0 holds every token: all of them start selected
            rows.selected = _by_position(slot_pos, valid, int(slot_pos.max()) + 1)
        live = valid & rows.selected.gather(1, slot_pos.clamp(0, rows.selected.shape[1] - 1))
        see = live[:, None, :] & (slot_pos[:, None, :] <= rows.pos[:, :, None])  # (B, R, N)
        own = torch.arange(r, device=see.device)
        see[:, own, n - r + own] = True  # every row sees itself (padding rows too: no empty softmax)
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=see[:, None], scale=scaling,
                                             enable_gqa=query.shape[1] != hkv)
        rows.prune = self._prune(query, scaling, see[:, -1], slot_pos, rows)
        return out.transpose(1, 2).contiguous(), None

    def _prune(self, query, scaling, see_last, slot_pos, rows: Rows) -> torch.Tensor | None:
        """Deselect the lowest-scored share of the tokens the last row sees; (B, R) bool for the rows among them."""
        rate = self.policy.rate_at(self.layer_idx, self.n_layers)
        if rate <= 0:
            return None
        keys = self.storage.keys
        b, hkv, n, d = keys.shape
        q = query[:, :, -1].reshape(b, hkv, -1, d).float()  # the last token's query, (B, Hkv, G, D)
        logits = torch.einsum("bhgd,bhnd->bhgn", q, keys.float()) * scaling
        score = logits.masked_fill(~see_last[:, None, None], -math.inf).softmax(-1).mean((1, 2))  # (B, N)
        count = (rate * see_last.sum(-1)).floor().long()  # the paper's percentile of the tokens at this layer
        candidate = see_last.clone()
        candidate[:, n - 1] = False  # the last token is never pruned
        rank = score.masked_fill(~candidate, math.inf).argsort(dim=-1, stable=True).argsort(-1)
        drop = candidate & (rank < count[:, None])
        rows.selected &= ~_by_position(slot_pos, drop, rows.selected.shape[1])
        return drop[:, n - query.shape[2]:]


def install(model) -> None:
    """Hooks on the decoder layers of ``model`` (graphprune's own copy) that carry LazyLLM's rows between layers."""
    decoder = model.get_decoder()
    layers, rotary = decoder.layers, decoder.rotary_emb
    last = len(layers) - 1

    def before(module, args, kwargs):
        cache = _cache(kwargs)
        if cache is None:
            return None
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        idx = module.self_attn.layer_idx
        b, n = hidden.shape[:2]
        if idx == 0:  # a new forward: its tokens are the rows
            pos = kwargs["position_ids"][..., -n:].expand(b, n)
            real = _real_tokens(kwargs.get("attention_mask"), b, n, hidden.device) if cache.layers[0].prompt_len is None \
                else torch.ones(b, n, dtype=torch.bool, device=hidden.device)
            cache.call.lazy = Rows(pos, real, torch.ones_like(real), n)
        rows: Rows = cache.call.lazy
        if idx > 0:
            hidden = _revive(rows, cache.layers[idx], cache.layers[idx - 1], hidden)
        if rows.moved:  # the rows are no longer the model's: their own positions
            kwargs["position_embeddings"] = rotary(hidden, rows.pos)
            kwargs["position_ids"] = rows.pos
        kwargs["attention_mask"] = None  # LazyLayer masks by position and selection
        return (hidden, *args[1:]), kwargs

    def after(module, args, kwargs, output):
        cache = _cache(kwargs)
        rows: Rows | None = None if cache is None else cache.call.lazy
        if rows is None:
            return None
        idx = module.self_attn.layer_idx
        hidden = output[0] if isinstance(output, tuple) else output
        prune, rows.prune = rows.prune, None
        keep = rows.real if prune is None else rows.real & ~prune
        if prune is not None and idx < last:  # the Aux Cache of this layer keeps their hidden states
            _stash(cache.layers[idx], prune & rows.real, rows.pos, hidden)
        if idx == last:  # only this forward's tokens come out (revived ones were computed for their keys and values)
            keep = keep & rows.new
        if bool(keep.all()):
            return None
        _, rows.real, rows.pos, rows.new, hidden = _compact(keep, rows.pos, rows.new, hidden)
        rows.moved = True
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    for layer in layers:
        layer.register_forward_pre_hook(before, with_kwargs=True)
        layer.register_forward_hook(after, with_kwargs=True)


def _cache(kwargs) -> EvictingCache | None:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return cache if isinstance(cache, EvictingCache) else None


def _stash(layer: LazyLayer, which: torch.Tensor, pos: torch.Tensor, hidden: torch.Tensor) -> None:
    """Append the hidden states of rows ``which`` (B, R) to ``layer``'s Aux Cache."""
    if not bool(which.any()):
        return
    _, real, pos, hidden = _compact(which, pos, hidden)
    pos = pos.masked_fill(~real, -1)
    if layer.hidden is not None:
        hidden = torch.cat([layer.hidden, hidden], 1)
        pos = torch.cat([layer.hidden_pos, pos], 1)
    layer.hidden, layer.hidden_pos = hidden, pos


def _revive(rows: Rows, layer: LazyLayer, below: LazyLayer, hidden: torch.Tensor):
    """Bring the selected tokens that have no keys and values at ``layer`` back from the Aux Cache of the layer
    below; returns the hidden rows (as they were when none revive)."""
    t = rows.selected.shape[1]
    st = layer.storage
    have = _by_position(st.pos[:, 0], st.valid[:, 0], t) if st.valid is not None else torch.zeros_like(rows.selected)
    revive = rows.selected & ~have & ~_by_position(rows.pos, rows.real, t)
    if not bool(revive.any()):
        return hidden
    stored, stored_pos = below.hidden, below.hidden_pos
    k = int(revive.sum(-1).max())
    pos = revive.long().argsort(dim=-1, descending=True, stable=True)[:, :k]  # revived positions first, ascending
    real = revive.gather(1, pos)
    entry = torch.full((revive.shape[0], t + 1), -1, dtype=torch.long, device=pos.device)
    if stored is not None:
        entry.scatter_(1, stored_pos.masked_fill(stored_pos < 0, t),
                       torch.arange(stored.shape[1], device=pos.device).expand_as(stored_pos))
    found = entry.gather(1, pos)
    if bool((real & (found < 0)).any()):
        raise RuntimeError("graphprune lazyllm: a selected token has neither keys and values nor an Aux-Cache entry "
                           f"at layer {layer.layer_idx}")
    back = _gather(stored, found.clamp(min=0)) if stored is not None else hidden.new_zeros(*pos.shape, hidden.shape[-1])
    _, rows.real, rows.pos, rows.new, hidden = _compact(
        torch.cat([rows.real, real], 1), torch.cat([rows.pos, pos], 1),
        torch.cat([rows.new, torch.zeros_like(real)], 1), torch.cat([hidden, back.to(hidden.dtype)], 1))
    rows.moved = True
    return hidden
