"""An evicting KV cache for Hugging Face decoders, and the attention function that drives it.

Each layer stores keys and values at the model's KV head count, ``(batch, kv_heads, slots,
head_dim)``, plus per slot: whether it holds a real token (padding never does), the position
the token was rotated with, and whatever per-slot state the recipe keeps (accumulated
attention for H2O, ...). Slots are appended in order; recipes that evict one token per step
reuse the freed slot in place (ring mode) and read the order from the positions.

The model's attention modules call ``cache.update`` and then the registered attention
function ``graphprune_kv`` (:func:`kv_attention`). The update appends the new keys and marks
the layer as pending; the attention function then attends with fused SDPA (the prompt with
the model's own causal mask, later steps with the slots' validity), lets the recipe score the
slots from q and k for the query rows it needs, and evicts down to the recipe's capacity.
"""

from __future__ import annotations

import contextvars
import math

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward

ATTENTION = "graphprune_kv"
_PENDING: contextvars.ContextVar = contextvars.ContextVar("graphprune_kv_pending", default=None)
_ROW_CHUNK = 256  # query rows scored at once when a recipe needs every row (bounded memory, never the L×L matrix)


class EvictingLayer(CacheLayerMixin):
    """One layer of an :class:`EvictingCache`."""

    is_compileable = False
    is_croppable = False

    def __init__(self, recipe, layer_idx: int, n_layers: int, inv_freq: torch.Tensor | None = None):
        super().__init__()
        self.recipe, self.layer_idx, self.n_layers, self.inv_freq = recipe, layer_idx, n_layers, inv_freq
        self.valid: torch.Tensor | None = None  # (B, Hkv, N) bool
        self.pos: torch.Tensor | None = None  # (B, Hkv, N) long: position each key was rotated with
        self.state: dict[str, torch.Tensor] = {}  # recipe's per-slot tensors, (B, Hkv, N, ...)
        self.aux: dict[str, torch.Tensor] = {}  # recipe's per-sequence tensors, (B, ...) (FastGen's head policies)
        self.seen = 0  # tokens written so far, padding included (what HF calls the sequence length)
        self.prompt_len: int | None = None
        self.capacity: int | None = None
        self.pending = 0
        self.static: int | None = None  # static-shape mode (export): slots = capacity + static, padded with empty slots
        self.inputs: dict = {}  # shared with the cache: the current forward's input_ids

    # -- transformers' cache-layer protocol -------------------------------------------------
    def lazy_initialization(self, key_states, value_states) -> None:
        self.device = key_states.device
        self.keys = key_states[..., :0, :]
        self.values = value_states[..., :0, :]
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.pending:
            raise RuntimeError("graphprune: a cache update arrived before the previous one was attended to; "
                               "the model must use the 'graphprune_kv' attention function")
        hole = self.aux.get("_hole")
        if hole is not None and key_states.shape[-2] == 1:  # ring mode: the new token takes the freed slot, in place
            idx = hole[:, :, None, None].expand(*hole.shape, 1, key_states.shape[-1])
            self.keys.scatter_(2, idx, key_states)
            self.values.scatter_(2, idx, value_states)
        else:
            self.aux.pop("_hole", None)  # several tokens at once: append (the freed slot stays empty)
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        self.pending = key_states.shape[-2]
        self.seen += self.pending
        _PENDING.set(self)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        inputs = self.inputs
        type(self).__init__(self, self.recipe, self.layer_idx, self.n_layers, self.inv_freq)
        self.inputs = inputs

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    # -- slots -------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every cached key and value, in full precision, (B, Hkv, N, D) each."""
        return self.keys, self.values

    @property
    def nbytes(self) -> int:
        """Bytes held for this layer's keys and values (the recipe's bookkeeping excluded)."""
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values) if t is not None)

    def _slots(self, fn) -> None:
        """Apply ``fn`` to every per-slot tensor: keys, values, validity, positions, the recipe's scores."""
        self.keys, self.values = fn(self.keys), fn(self.values)
        if self.valid is not None:
            self.valid, self.pos = fn(self.valid), fn(self.pos)
        self.state = {k: fn(v) for k, v in self.state.items()}

    def _map(self, fn) -> None:
        """Apply a batch operation (beam reorder, repeat, select) to everything the layer holds."""
        if self.keys is None:
            return
        self._slots(fn)
        self.aux = {k: fn(v) for k, v in self.aux.items()}

    def keep(self, idx: torch.Tensor) -> None:
        """Keep the slots ``idx`` (B, Hkv, C), which must be sorted, in that order."""
        self._slots(lambda t: t.gather(2, _per_slot(idx, t)))

    def newest(self) -> torch.Tensor:
        """(B, Hkv, 1): the position of the newest real token."""
        return self.pos.masked_fill(~self.valid, -1).amax(-1, keepdim=True)

    def recent(self, window: int) -> torch.Tensor:
        """(B, Hkv, N) bool: the ``window`` most recent real tokens (positions of real tokens are consecutive, and
        recipes that protect a recent window never evict inside it)."""
        return self.valid & (self.pos > self.newest() - window)

    def rank(self) -> torch.Tensor:
        """(B, Hkv, N): each real token's place in the cache by position (0 = oldest)."""
        order = self.pos.masked_fill(~self.valid, torch.iinfo(self.pos.dtype).max).argsort(-1)
        return order.argsort(-1)

    def top(self, scores: torch.Tensor, capacity: int, protect: torch.Tensor | None = None) -> torch.Tensor:
        """Sorted indices of the ``capacity`` best slots: protected ones first, padding last."""
        s = scores.to(torch.float32)
        if protect is not None:
            s = s.masked_fill(protect & self.valid, math.inf)
        s = s.masked_fill(~self.valid, -math.inf)
        n = s.shape[-1]
        if capacity == n - 1:  # one slot goes (every decoding step): an argmin, not a sort
            slot = torch.arange(n - 1, device=s.device)
            return slot + (slot >= s.argmin(-1)[..., None])
        return s.topk(capacity, dim=-1).indices.sort(dim=-1).values

    # -- attention rows, computed from q and k ---------------------------------------------
    def attention_rows(self, query: torch.Tensor, scaling: float, rows: int) -> torch.Tensor:
        """Softmax attention of the last ``rows`` queries over every slot, float32, (B, Hkv, G, rows, N).

        Causal (each query sees the slots up to its own) and restricted to real tokens.
        """
        return self._rows(query, scaling, query.shape[2] - rows, query.shape[2])

    def attention_column_sums(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention each slot receives, summed over every new query row, (B, Hkv, G, N); in row chunks."""
        total = 0
        for start in range(0, query.shape[2], _ROW_CHUNK):
            total = total + self._rows(query, scaling, start, min(start + _ROW_CHUNK, query.shape[2])).sum(-2)
        return total

    def _rows(self, query, scaling, start, stop):
        b, hq, q_len, d = query.shape
        hkv, n = self.keys.shape[1], self.keys.shape[2]
        q = query[:, :, start:stop].reshape(b, hkv, hq // hkv, stop - start, d).float()
        upto = n - q_len + stop  # keys after the chunk's last query are never seen: leave them out of the product
        logits = torch.einsum("bhgrd,bhnd->bhgrn", q, self.keys[:, :, :upto].float()) * scaling
        see = self.visible(q_len, start, stop)[..., :upto]
        probs = logits.masked_fill(~see, -math.inf).softmax(-1).nan_to_num(0.0)
        return probs if upto == n else torch.nn.functional.pad(probs, (0, n - upto))

    def visible(self, q_len: int, start: int, stop: int) -> torch.Tensor:
        """(B, Hkv, 1, rows, N) bool: the real slots each of the new query rows start:stop can see (causal)."""
        n = self.length
        slot = torch.arange(n, device=self.keys.device)
        own = n - q_len + torch.arange(start, stop, device=self.keys.device)  # slot of each query row
        return (slot[None, :] <= own[:, None])[None, None, None] & self.valid[:, :, None, None, :]

    # -- one attention call ------------------------------------------------------------------
    def attend(self, module, query, attention_mask, scaling, dropout, kwargs):
        n_new, self.pending = self.pending, 0
        b, hkv = self.keys.shape[:2]
        first = self.valid is None
        if first:  # the prompt: the model's own causal + padding mask, fused attention
            out, _ = sdpa_attention_forward(module, query, self.keys, self.values, attention_mask,
                                            dropout=dropout, scaling=scaling, **kwargs)
            self.append(_real_tokens(attention_mask, b, n_new, query.device), _positions(kwargs, b, n_new, query.device))
        else:
            self.append(None, _positions(kwargs, b, n_new, query.device))
            keys, values = self.kv()
            q_used, k_used = self.recipe.attention_inputs(self, query, keys)
            mask = self.visible(n_new, 0, n_new)[:, :, 0].repeat_interleave(query.shape[1] // hkv, dim=1)
            out = F.scaled_dot_product_attention(q_used, k_used, values, attn_mask=mask, scale=scaling,
                                                 enable_gqa=query.shape[1] != hkv)
            out = out.transpose(1, 2).contiguous()
        self.evict(query, scaling, first)
        return out, None

    def append(self, real: torch.Tensor | None, pos: torch.Tensor) -> None:
        """Describe the newest slots: which hold real tokens (B, n; None: all) and their positions (B, n)."""
        b, hkv = self.keys.shape[:2]
        n = pos.shape[-1]
        real = pos.new_ones(b, n, dtype=torch.bool) if real is None else real
        if self.valid is None:
            self.prompt_len = n
            self.valid, self.pos = real[:, None].expand(b, hkv, n), pos[:, None].expand(b, hkv, n)
        elif "_hole" in self.aux:  # ring mode: describe the refilled slot, clear the recipe's scores there
            hole = self.aux["_hole"][..., None]
            self.valid.scatter_(2, hole, True)
            self.pos.scatter_(2, hole, pos[:, None].expand(b, hkv, 1))
            for t in self.state.values():
                t.scatter_(2, _per_slot(hole, t), 0)
        else:
            self.valid = torch.cat([self.valid, real[:, None].expand(b, hkv, n)], dim=-1)
            self.pos = torch.cat([self.pos, pos[:, None].expand(b, hkv, n)], dim=-1)

    def evict(self, query: torch.Tensor, scaling: float, prompt: bool) -> None:
        """Let the recipe score the slots with the new queries, and keep its choice when over capacity."""
        if self.capacity is None:
            self.capacity = self.recipe.layer_capacity(self.layer_idx, self.n_layers, self.prompt_len)
        self.recipe.observe(self, query, scaling, prompt)
        if prompt and self.recipe.prunes_prompt:
            select = self.recipe.prompt_selection(self, query, scaling)
            if select is not None:
                self.inputs["select"] = select
        if self.length > self.capacity and (prompt or self.recipe.evicts_while_decoding):
            keep = self.recipe.select(self, query, scaling, self.capacity)
            if (not prompt and self.recipe.ring and self.static is None and query.shape[2] == 1
                    and self.length == self.capacity + 1):
                self.free(keep)
            else:
                self.aux.pop("_hole", None)
                self.keep(keep)
        if self.static is not None:  # a fixed slot count: empty slots go first, real tokens are never dropped for them
            slots = self.capacity + self.static
            if self.length < slots:
                self.pad(slots - self.length)
            elif self.length > slots:
                self.keep(self.top(torch.zeros_like(self.pos, dtype=torch.float32), slots, protect=self.valid))

    def free(self, keep: torch.Tensor) -> None:
        """Ring mode: mark the one slot per (sequence, head) that ``keep`` leaves out as free; the next token is
        written there in place (no copy of the cache per step). Slots are then no longer in order: recipes that
        run in ring mode read the order from the positions."""
        if "_hole" not in self.aux:  # entering the ring: own the bookkeeping tensors (they may be expanded views)
            self.valid, self.pos = self.valid.clone(), self.pos.clone()
            self.state = {k: v.clone() for k, v in self.state.items()}
        # keep is sorted and leaves out one slot: the slots before it are kept as they are, so their count is its index
        hole = (keep == torch.arange(keep.shape[-1], device=keep.device)).sum(-1)
        self.valid.scatter_(2, hole[..., None], False)
        self.aux["_hole"] = hole

    def fresh(self, t: torch.Tensor) -> torch.Tensor:
        """A per-slot score tensor extended with zeros for the slots appended since (ring mode: as it is)."""
        grow = self.length - t.shape[2]
        return t if grow == 0 else torch.cat([t, t.new_zeros(*t.shape[:2], grow, *t.shape[3:])], dim=2)

    def pad(self, n: int) -> None:
        """Add ``n`` empty slots before the others (static shapes)."""
        self._slots(lambda t: torch.cat([t.new_zeros(*t.shape[:2], n, *t.shape[3:]), t], dim=2))


def _per_slot(idx: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Slot indices ``idx`` (B, Hkv, k) expanded over the trailing dimensions of ``t`` (B, Hkv, N, ...)."""
    return idx.reshape(*idx.shape, *([1] * (t.dim() - 3))).expand(*idx.shape, *t.shape[3:])


def _real_tokens(mask, b, n, device) -> torch.Tensor:
    """(B, N) bool: the prompt positions that hold real tokens, read from the model's 4-D mask."""
    if mask is None:
        return torch.ones(b, n, dtype=torch.bool, device=device)
    last = mask[:, 0, -1, -n:]  # the last query sees every real token of its sequence
    if last.dtype != torch.bool:
        last = last > torch.finfo(last.dtype).min / 2
    return last.expand(b, n)


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch, as ``generate`` computes them (padding at 1; it is masked anyway)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def _positions(kwargs, b, n, device) -> torch.Tensor:
    pos = kwargs.get("position_ids")
    if pos is None:
        raise RuntimeError("graphprune: the model did not pass position_ids to its attention")
    return pos[..., -n:].to(device).expand(b, n)


class EvictingCache(Cache):
    """A KV cache whose layers evict by a cache recipe (see :mod:`graphprune.recipes.cache`)."""

    def __init__(self, recipe, n_layers: int, inv_freq: torch.Tensor | None = None):
        layer = recipe.cache_layer() or EvictingLayer
        super().__init__(layers=[layer(recipe, i, n_layers, inv_freq) for i in range(n_layers)])
        self.recipe = recipe
        self.inputs: dict = {}  # the current forward's input_ids, for recipes that read the tokens
        for layer in self.layers:
            layer.inputs = self.inputs

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached keys and values of every layer."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def full_nbytes(self) -> int:
        """Bytes a full (never evicting) cache would hold for the same tokens."""
        return sum(2 * layer.keys.shape[0] * layer.keys.shape[1] * layer.keys.shape[-1] * layer.keys.element_size() * layer.seen
                   for layer in self.layers if layer.keys is not None)

    def memory(self) -> dict:
        """Cache memory: bytes held, bytes a full cache would hold, their ratio, and the share of slots that
        hold a real token (below 1 when heads keep different numbers of tokens, or with padding)."""
        held, full = self.nbytes, self.full_nbytes
        live = [(int(layer.valid.sum()), layer.valid.numel() * max(layer.seen, 1) // max(layer.length, 1))
                for layer in self.layers if layer.valid is not None]
        used = sum(a for a, _ in live) / max(sum(b for _, b in live), 1)
        return {"bytes": held, "full_bytes": full, "ratio": held / full if full else 1.0, "token_ratio": used,
                "slots_per_layer": self.slots()}

    def slots(self) -> list[int]:
        """Cached tokens per layer (padding slots included)."""
        return [layer.length for layer in self.layers]

    # -- static shapes: the cache as a flat list of tensors (ONNX inputs and outputs) -------------
    def state_names(self) -> list[str]:
        return [f"{name}.{i}" for i in range(len(self.layers)) for name in ("keys", "values", "valid", "pos", *self.recipe.state)]

    def flat(self) -> list[torch.Tensor]:
        return [t for layer in self.layers
                for t in (layer.keys, layer.values, layer.valid, layer.pos, *(layer.state[k] for k in self.recipe.state))]

    def load_flat(self, tensors, capacities: list[int], extra: int) -> "EvictingCache":
        """Fill the layers from :meth:`flat` tensors, in static mode (``capacities`` + ``extra`` slots each)."""
        per = 4 + len(self.recipe.state)
        for i, layer in enumerate(self.layers):
            keys, values, valid, pos, *state = tensors[i * per:(i + 1) * per]
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values, layer.valid, layer.pos = keys, values, valid, pos
            layer.state = dict(zip(self.recipe.state, state))
            layer.capacity, layer.static, layer.prompt_len = capacities[i], extra, 0
        return self

    def make_static(self, extra: int) -> "EvictingCache":
        """Static-shape mode: every layer ends each call with capacity + ``extra`` slots."""
        for layer in self.layers:
            layer.static = extra
        return self


def kv_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """The ``graphprune_kv`` attention function: SDPA, plus scoring and eviction when the cache is ours."""
    layer = _PENDING.get()
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if layer is None or not layer.pending or layer.layer_idx != getattr(module, "layer_idx", None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    _PENDING.set(None)
    return layer.attend(module, query, attention_mask, scaling, dropout, kwargs)


def register() -> None:
    """Register ``graphprune_kv`` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, kv_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
