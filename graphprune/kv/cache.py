"""The evicting KV cache for Hugging Face decoders, and the attention function that drives it.

The copy's attention modules call ``cache.update`` (the layer stores the new keys and values)
and then the registered attention function ``graphprune_kv`` (:func:`kv_attention`), which a
hook on each attention module hands the layer as an argument. The layer attends with fused SDPA
(the prompt with the model's own causal mask, later steps with the slots' validity), shows the
policy a :class:`~graphprune.kv.view.View`, and evicts down to the policy's capacity.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from graphprune.kv.policy import FULL, CachePolicy, Codec, When
from graphprune.kv.rows import Aux, Rows, is_media
from graphprune.kv.storage import Slots, Static, ranked, storage_for, top
from graphprune.kv.view import View
from graphprune.ops.rope import rotate

ATTENTION = "graphprune_kv"


@dataclass
class Call:
    """What the current forward passes to every layer: its token ids, and (with a policy that prunes rows) the rows
    the current layer computes; and, for the whole cache, the ids of the model's image and video placeholder tokens
    (a vision-language model's; None: text only)."""

    input_ids: torch.Tensor | None = None
    rows: Rows | None = None
    media: torch.Tensor | None = None
    images: torch.Tensor | None = None  # (B,) image and video tokens this forward brought in (with media and ids)
    blocks: torch.Tensor | None = None  # (B, L) this forward's tokens' attention blocks: tokens of one block >= 0 see
    # each other both ways (a prefix or an image: PaliGemma, Gemma 3); -1: causal. None: all causal
    rows_plan: tuple[int, ...] | None = None  # a static export: the rows each layer passes up in the prompt pass
    # (counts fixed in advance, no shape read from the data; see CachePolicy.image_rows_after). None: as the data needs


class EvictingLayer(CacheLayerMixin):
    """One layer of an :class:`EvictingCache`."""

    is_compileable = False
    is_sliding = False

    def __init__(self, policy: CachePolicy, layer_idx: int, n_layers: int, inv_freq: torch.Tensor | None = None,
                 call: Call | None = None, static: int | None = None, window: int | None = None,
                 codec: Codec | None = None):
        self.is_initialized = False  # (CacheLayerMixin.__init__ would assign keys and values: they are the storage's)
        self.policy, self.layer_idx, self.n_layers, self.inv_freq = policy, layer_idx, n_layers, inv_freq
        self.call = Call() if call is None else call
        self.static = static
        self.window = window  # a sliding-window layer's window (tokens a query sees, itself included); None: all
        self.codec = policy.codec() if codec is None else codec  # (the layer's own, made from the model's weights)
        self.storage: Slots = storage_for(policy, static, self.codec)
        self.seen = 0  # tokens written so far, padding included (what HF calls the sequence length)
        self.prompt_len: int | None = None
        self.capacity: int | None = None
        self.aux: Aux | None = None  # hidden states of the rows this layer stopped (policies that revive them)

    # -- transformers' cache-layer protocol -------------------------------------------------------
    @property
    def keys(self):
        return self.storage.keys

    @property
    def values(self):
        return self.storage.values

    def lazy_initialization(self, key_states, value_states, *args) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.storage.write(key_states, value_states)
        rows = self.call.rows
        self.seen += key_states.shape[-2] if rows is None else rows.n_new  # revived rows are not new tokens
        return self.storage.keys, self.storage.values

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.storage.length + query_length, 0

    def get_seq_length(self, *args) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1

    def reset(self) -> None:
        type(self).__init__(self, self.policy, self.layer_idx, self.n_layers, self.inv_freq, self.call, self.static,
                            self.window, self.codec)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def _map(self, fn) -> None:
        self.storage.map(fn)
        if self.aux is not None:
            a = self.aux
            self.aux = Aux(*(fn(t) for t in (a.hidden, a.pos, a.rope)))

    # -- one attention call ----------------------------------------------------------------------
    @property
    def length(self) -> int:
        return self.storage.length

    def view(self, query: torch.Tensor, scaling: float, prefill: bool, pos: torch.Tensor, real: torch.Tensor | None) -> View:
        call, st = self.call, self.storage
        rows, ids, n = call.rows, call.input_ids, query.shape[2]
        ids = rows.ids if rows is not None else None if ids is None else ids[:, -n:]
        blocks = rows.block if rows is not None else None if call.blocks is None else call.blocks[:, -n:]
        visual = video = None
        if call.media is not None and ids is not None and self.policy.needs_images:
            visual, video = is_media(ids, call.media), is_media(ids, call.media[1:])
        return View(st, query, scaling, prefill=prefill, prompt_len=self.prompt_len, layer=self.layer_idx,
                    n_layers=self.n_layers, capacity=self.capacity, input_ids=ids, visual=visual, images=call.images,
                    inv_freq=self.inv_freq,
                    query_pos=pos, query_real=real, selected=None if rows is None else rows.visible(st.pos[:, 0]),
                    window=self.window, blocks=blocks, query_log_size=None if rows is None else rows.log_size,
                    video=video)

    def attend(self, module, query, attention_mask, scaling, dropout, kwargs):
        st, rows, b, n_new = self.storage, self.call.rows, query.shape[0], query.shape[2]
        prefill = self.prompt_len is None
        if rows is not None:  # the rows stage says which tokens these are
            pos, real = rows.pos, rows.real
        else:
            pos = _positions(kwargs, b, n_new, query.device)
            real = real_tokens(attention_mask, b, n_new, query.device) if prefill else None  # (None: every token)
        view = self.receive(query, scaling, real, pos)
        early = None if rows is None else self.policy.rows_before(view)
        if early is not None:  # these rows stop before this layer: its attention and cache leave them out
            self.stop(early, view)
            view.selected = rows.visible(st.pos[:, 0])
        moved = None if rows is None else self.policy.renumber(view)
        if moved is not None:  # the rows take new positions from this layer on
            query, view = self.renumber(query, view, moved, scaling, real)
        bias = self.policy.attention_bias(view)
        own_mask = rows is None or not rows.moved
        if prefill and own_mask and early is None and self.window is None and bias is None:  # the prompt: the model's
            # own mask, fused (a sliding window counts positions here: tokens left out before the language model keep
            # theirs)
            out, _ = sdpa_attention_forward(module, query, st.keys, st.values, attention_mask,
                                            dropout=dropout, scaling=scaling, **kwargs)
        else:
            mask = None
            if rows is not None:  # by position and selection; every row sees itself (padding rows too)
                mask = view.visible()[:, :, 0].clone()
                own = torch.arange(n_new, device=mask.device)
                mask[:, :, own, view.slots - n_new + own] = True
            elif n_new > 1 or self.window is not None:
                mask = view.visible()[:, :, 0]
            elif not st.all_real():  # one new token sees every real slot
                mask = st.valid[:, :, None, :]
            if bias is not None:  # proportional attention: each slot's logits move by its bias
                bias = bias[:, :, None, :].to(query.dtype)
                mask = bias.expand(b, -1, n_new, -1) if mask is None else \
                    torch.where(mask, bias, torch.finfo(query.dtype).min)
            keys, values, override = view.keys, view.values, self.policy.attention_keys(view)
            chosen = None if prefill else self.policy.attention_slots(view)
            if chosen is not None:  # sparse attention: the chosen slots alone (the cache keeps every one)
                keys, values, mask = _chosen(keys, values, mask, chosen)
            if override is None:
                out = _grouped_attention(query, keys, values, mask, scaling)
            else:  # swap the policy's keys in for the attention call only (a few slots, in place)
                st.writable()
                keys = view.keys
                idx = override.slots[..., None].expand_as(override.keys)
                cached = keys.gather(2, idx)
                keys.scatter_(2, idx, override.keys)
                try:
                    out = _grouped_attention(query, keys, values, mask, scaling)
                finally:
                    keys.scatter_(2, idx, cached)
        if early is not None:  # (no longer held; the policy still sees this call's slots as they were written)
            st.forget(early[:, None].expand_as(st.valid))
        self.evict(view)
        if early is not None:
            st.remove(torch.zeros_like(st.valid))  # (gives up the room no sequence needs)
        return out, None

    def renumber(self, query: torch.Tensor, view: View, new: torch.Tensor, scaling: float,
                 real: torch.Tensor | None) -> tuple[torch.Tensor, View]:
        """This call's rows move to positions ``new`` (B, L): its queries and the new slots' keys turn by the
        difference, the slots and the rows (for the layers above) take the new positions, and the rows' rotary
        embeddings turn alike. Returns the turned queries and the view of the renumbered slots."""
        rows, st, n = self.call.rows, self.storage, view.n_new
        delta = new - rows.pos
        keep = view.selected
        st.writable()
        turned = rotate(st.keys[:, :, -n:], delta[:, None].expand(-1, st.keys.shape[1], -1), self.inv_freq)
        st.keys[:, :, -n:] = turned
        old = st.pos
        st.pos = torch.cat([old[:, :, :-n], new[:, None].expand(-1, old.shape[1], -1).to(old.dtype)], 2)
        query = rotate(query, delta[:, None].expand(-1, query.shape[1], -1), self.inv_freq)
        ang = delta.float()[..., None] * self.inv_freq.to(delta.device, torch.float32)
        c, s = torch.cat([ang.cos()] * 2, -1)[:, :, None], torch.cat([ang.sin()] * 2, -1)[:, :, None]
        cos, sin = rows.rope[:, :, :, 0].float(), rows.rope[:, :, :, 1].float()
        rows.rope = torch.stack([cos * c - sin * s, sin * c + cos * s], 3).to(rows.rope.dtype)
        rows.pos, rows.stopped = new, None  # (the tokens stopped so far are no longer among these positions)
        rows.moved = True  # (the layers above take the rows' own positions and rotary embeddings)
        view = self.view(query, scaling, view.prefill, new, real)
        view.selected = keep
        return query, view

    def stop(self, stop: torch.Tensor, view: View) -> None:
        """The rows stage: the tokens of this layer's slots where ``stop`` (B, N) holds go no further in this forward."""
        rows, st = self.call.rows, self.storage
        rows.deselect(st.pos[:, 0], stop)
        mine = stop[:, st.length - view.n_new:]
        rows.drop = mine if rows.drop is None else rows.drop | mine

    def receive(self, query: torch.Tensor, scaling: float, real: torch.Tensor | None, pos: torch.Tensor) -> View:
        """Describe the slots just written: which hold real tokens (B, n; None: all) and their positions (B, n); the
        view the policy gets. The first call is the prompt."""
        prefill = self.prompt_len is None
        if prefill:
            self.prompt_len = pos.shape[-1]
            self.capacity = self.policy.capacity(self.layer_idx, self.n_layers, self.prompt_len)
        self.storage.describe(real, pos)
        return self.view(query, scaling, prefill, pos, real)

    def evict(self, view: View) -> None:
        """Let the policy update its state, stop rows, and rank the slots; keep its choice when over capacity."""
        policy, st, cap, rows = self.policy, self.storage, self.capacity, self.call.rows
        ranks = cap is None or cap < FULL  # the full cache has nothing to rank
        if ranks:
            policy.update(view)
        if rows is not None:
            stop = policy.rows(view)
            if stop is not None:
                self.stop(stop, view)
        due = policy.evicts is When.STEP or (view.prefill and policy.evicts is When.PROMPT)
        if ranks and due and (cap is None or st.length > cap):
            self.choose(policy.score(view), view)
        st.settle(cap)
        if self.window is not None and type(st) is Slots and not policy.revives:  # a sliding layer holds no token
            # that no later query can see (as the model's own cache: its window less one); a ring's capacity and a
            # static cache bound it already, and a policy that revives rows reads what the layers hold
            expired = st.valid & (st.pos <= view.newest() - self.window + 1)
            if bool(expired.any()):
                st.remove(expired)

    def choose(self, scores: torch.Tensor, view: View) -> None:
        """Evict by the scores: keep the policy's sinks and recent tokens, then the best scores (per KV head)."""
        st, cap, policy = self.storage, self.capacity, self.policy
        valid = None if st.all_real() else st.valid
        protect = None
        sinks = policy.sink_tokens()
        if sinks:
            protect = st.pos < sinks  # positions count real tokens from 0
        recent = policy.recent_tokens(cap) if cap is not None else 0
        if recent:
            protect = view.recent(recent) if protect is None else protect | view.recent(recent)
        if cap is not None and st.length == cap + 1:  # one slot goes (every decoding step): an argmin
            st.drop(ranked(scores, valid, protect).argmin(-1))
        elif cap is not None:
            st.keep(top(scores, valid, cap, protect))
        else:  # no fixed size: slots scored -inf go, the others stay (heads may keep different numbers: the rest is
            # padding)
            st.remove(~(scores > float("-inf")))


def _grouped_attention(query, keys, values, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """Fused attention of the new queries over the cached slots, (B, L, Hq, D); ``mask`` (B, Hkv, L, N) or None. The
    query heads that share a KV head become rows of one attention over that head's keys (no copies of the keys
    per query head)."""
    b, hq, n_new, d = query.shape
    hkv = keys.shape[1]
    g = hq // hkv
    q = query.reshape(b, hkv, g * n_new, d)  # rows ordered (query head in group, new token)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=None if mask is None else mask.repeat(1, 1, g, 1),
                                         scale=scaling)
    return out.reshape(b, hq, n_new, -1).transpose(1, 2).contiguous()


def _chosen(keys, values, mask: torch.Tensor | None, chosen: torch.Tensor):
    """The keys, values and mask of the ``chosen`` (B, Hkv, N) slots alone, in slot order: as many slots as the row
    that chose most, the others' extra ones masked."""
    k = int(chosen.sum(-1).amax())
    idx = chosen.to(torch.uint8).sort(dim=-1, descending=True, stable=True).indices[..., :k]
    picked = chosen.gather(-1, idx)[:, :, None, :]
    keys = keys.gather(2, idx[..., None].expand(-1, -1, -1, keys.shape[-1]))
    values = values.gather(2, idx[..., None].expand(-1, -1, -1, values.shape[-1]))
    if mask is None:
        return keys, values, picked
    mask = mask.expand(*idx.shape[:2], *mask.shape[2:]).gather(-1, idx[:, :, None, :].expand(-1, -1, mask.shape[2], -1))
    if mask.dtype == torch.bool:
        return keys, values, mask & picked
    return keys, values, torch.where(picked, mask, torch.finfo(mask.dtype).min)


def real_tokens(mask, b, n, device) -> torch.Tensor:
    """(B, N) bool: the prompt positions that hold real tokens, read from the model's 4-D mask (a real token sees
    itself, padding sees nothing; in every kind of mask: causal, sliding window, bidirectional blocks)."""
    if mask is None:
        return torch.ones(b, n, dtype=torch.bool, device=device)
    own = mask[:, 0, -n:, -n:].diagonal(dim1=-2, dim2=-1)
    if own.dtype != torch.bool:
        own = own > torch.finfo(own.dtype).min / 2
    return own.expand(b, n)


def _positions(kwargs, b, n, device) -> torch.Tensor:
    pos = kwargs.get("position_ids")
    if pos is None:
        raise RuntimeError("graphprune: the model did not pass position_ids to its attention")
    pos = pos[..., -n:]
    if pos.device != device:
        pos = pos.to(device)
    return pos if pos.shape == (b, n) else pos.expand(b, n)


class EvictingCache(Cache):
    """A KV cache whose layers evict by a cache policy (see :mod:`graphprune.kv.policy`)."""

    def __init__(self, policy: CachePolicy, n_layers: int, inv_freq: tuple[torch.Tensor | None, ...] = (),
                 static: int | None = None, media: tuple[int, ...] = (), windows: tuple[int | None, ...] = (),
                 codecs: tuple[Codec | None, ...] = (), rows_plan: tuple[int, ...] | None = None):
        """``inv_freq``, ``windows``, ``codecs``: each layer's RoPE frequencies, sliding window and codec (default:
        none; the policy's codec); ``rows_plan``: see :class:`Call`."""
        self.call = Call(media=torch.tensor(media) if media else None, rows_plan=rows_plan)
        inv_freq, windows = inv_freq or (None,) * n_layers, windows or (None,) * n_layers
        codecs = codecs or (None,) * n_layers
        super().__init__(layers=[EvictingLayer(policy, i, n_layers, inv_freq[i], self.call, static, windows[i],
                                               codecs[i]) for i in range(n_layers)])
        self.policy = policy
        self.shift: torch.Tensor | None = None  # (B,) positions the prompt closed up over image tokens left out before
        # the language model (a policy that renumbers): later calls' positions, counted over the whole prompt, move down

    def begin(self, input_ids: torch.Tensor | None, blocks: torch.Tensor | None = None) -> None:
        """A new forward starts: its token ids and attention blocks (see :class:`Call`); no prompt rows chosen yet."""
        call = self.call
        call.input_ids, call.rows, call.blocks = input_ids, None, blocks
        if call.media is not None and input_ids is not None and self.policy.needs_images:
            call.media = call.media.to(input_ids.device)  # (once: the model's device)
            call.images = is_media(input_ids, call.media).sum(-1)
        else:
            call.images = None

    # -- batch operations (beam search, contrastive search): the per-sequence shift follows ------------------------
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.shift is not None:
            self.shift = self.shift[beam_idx.to(self.shift.device)]

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.shift is not None:
            self.shift = self.shift.repeat_interleave(repeats, 0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.shift is not None:
            self.shift = self.shift[indices.to(self.shift.device)]

    def skip(self, n: int) -> None:
        """The prompt had ``n`` more positions than its layers saw (image tokens left out before the language model):
        the sequence's length counts them, so that decoding goes on at the positions the full prompt would have."""
        for layer in self.layers:
            layer.seen += n

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached keys and values of every layer."""
        return sum(layer.storage.nbytes + (0 if layer.aux is None else layer.aux.nbytes) for layer in self.layers)

    @property
    def full_nbytes(self) -> int:
        """Bytes a full (never evicting) cache would hold for the same tokens."""
        return sum(2 * layer.keys.shape[0] * layer.keys.shape[1] * layer.keys.shape[-1] * layer.keys.element_size() * layer.seen
                   for layer in self.layers if layer.keys is not None)

    def memory(self) -> dict:
        """Cache memory: bytes held, bytes a full cache would hold, their ratio, and the share of slots that
        hold a real token (below 1 when heads keep different numbers of tokens, or with padding)."""
        held, full = self.nbytes, self.full_nbytes
        live = [(int(layer.storage.valid.sum()), layer.storage.valid.numel() * max(layer.seen, 1) // max(layer.length, 1))
                for layer in self.layers if layer.storage.valid is not None]
        used = sum(a for a, _ in live) / max(sum(b for _, b in live), 1)
        return {"bytes": held, "full_bytes": full, "ratio": held / full if full else 1.0, "token_ratio": used,
                "slots_per_layer": self.slots()}

    def slots(self) -> list[int]:
        """Cached tokens per layer (padding slots included)."""
        return [layer.length for layer in self.layers]

    # -- static shapes: the cache as a flat list of tensors (ONNX inputs and outputs) -------------
    def _state_fields(self) -> list[str]:
        state = self.policy.new_state()
        return [] if state is None else [f.name for f in dataclasses.fields(state)]

    def state_names(self) -> list[str]:
        return [f"{name}.{i}" for i in range(len(self.layers))
                for name in ("keys", "values", "valid", "pos", *self._state_fields())]

    def flat(self) -> list[torch.Tensor]:
        fields = self._state_fields()
        return [t for layer in self.layers for st in [layer.storage]
                for t in (st.keys, st.values, st.valid, st.pos, *(getattr(st.state, f) for f in fields))]

    def load_flat(self, tensors, capacities: list[int]) -> "EvictingCache":
        """Fill the (static) layers from :meth:`flat` tensors, ``capacities`` + the static extra slots each."""
        fields = self._state_fields()
        per = 4 + len(fields)
        for i, layer in enumerate(self.layers):
            keys, values, valid, pos, *state = tensors[i * per:(i + 1) * per]
            layer.lazy_initialization(keys, values)
            st: Static = layer.storage
            st.load(keys, values, valid, pos)
            if st.state is not None:
                st.state = type(st.state)(**dict(zip(fields, state)))
            layer.capacity, layer.prompt_len = capacities[i], 0
        return self


def kv_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, kv_layer=None, **kwargs):
    """The ``graphprune_kv`` attention function: SDPA, plus scoring and eviction when the layer is ours."""
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if kv_layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    return kv_layer.attend(module, query, attention_mask, scaling, dropout, kwargs)


def cache_in(kwargs) -> EvictingCache | None:
    """graphprune's cache among the keyword arguments of a decoder layer or attention call (``cache`` or, before
    transformers 5.24, ``past_key_values``); None when the call runs without one."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return cache if isinstance(cache, EvictingCache) else None


def hand_layer(module, args, kwargs):
    """Forward pre-hook on an attention module of graphprune's copy: pass it its cache layer (an argument)."""
    cache = cache_in(kwargs)
    if cache is None:
        return None
    return args, {**kwargs, "kv_layer": cache.layers[module.layer_idx]}


def register() -> None:
    """Register ``graphprune_kv`` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, kv_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


__all__ = ["ATTENTION", "Call", "EvictingCache", "EvictingLayer", "cache_in", "kv_attention", "register"]
