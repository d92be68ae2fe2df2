"""What a cache policy sees of one layer after an attention call: a read-only, typed view.

Shapes: B batch, Hkv KV heads, G query heads per KV head, N cached slots, L new queries, D head size.
The scorers compute attention from q and k for just the query rows asked for (in chunks when all
of them are needed), never the full L × N matrix at once.
"""

from __future__ import annotations

import math
from functools import cached_property

import torch

from graphprune.kv.storage import Slots

ROW_CHUNK = 256  # query rows scored at once when a policy needs every row (bounded memory)


class View:
    """One layer's cache as a policy sees it, right after the new tokens were attended to.

    ``keys``, ``values`` (B, Hkv, N, D), ``positions`` (B, Hkv, N), ``valid`` (B, Hkv, N) bool (the slot holds a
    real token), ``queries`` (B, Hq, L, D) of the new tokens, ``scaling``, ``prefill`` (this call is the prompt),
    ``prompt_len`` (padding included), ``layer`` and ``n_layers``, ``capacity`` (the layer's budget; None: the policy
    decides), ``input_ids`` (B, L) of the new tokens when the model was called with them (-1: a revived row),
    ``inv_freq`` (RoPE), and ``state``: the policy's running state, which :meth:`CachePolicy.update` may change.
    ``query_pos`` (B, L) and ``query_real`` (B, L) describe the new query rows; ``visual`` (B, L) which of them are
    image or video tokens of a vision-language model (None: a text-only model; ``video``: which are video tokens), and
    ``images`` (B,) how many image and
    video tokens the forward brought in (before any was dropped); ``selected`` (B, N) (or None) the
    slots whose tokens no lower layer stopped in this forward (the prompt-rows stage): attention sees only those.
    ``window``: a sliding-window layer's window (a query sees the tokens less than that far back; None: all);
    ``blocks`` (B, L) the new tokens' attention blocks (tokens of one block >= 0 see each other both ways; None: all
    causal); ``query_log_size`` (B, L) the log of how many tokens each new row stands for (merged rows; None: one).
    """

    def __init__(self, storage: Slots, queries: torch.Tensor, scaling: float, *, prefill: bool, prompt_len: int,
                 layer: int, n_layers: int, capacity: int | None, input_ids: torch.Tensor | None,
                 inv_freq: torch.Tensor | None, query_pos: torch.Tensor, query_real: torch.Tensor | None,
                 selected: torch.Tensor | None = None, visual: torch.Tensor | None = None,
                 images: torch.Tensor | None = None, window: int | None = None, blocks: torch.Tensor | None = None,
                 query_log_size: torch.Tensor | None = None, video: torch.Tensor | None = None):
        self._storage = storage
        self.queries, self.scaling, self.prefill, self.prompt_len = queries, scaling, prefill, prompt_len
        self.layer, self.n_layers, self.capacity = layer, n_layers, capacity
        self.input_ids, self.visual, self.images, self.inv_freq = input_ids, visual, images, inv_freq
        self.query_pos, self.selected, self._query_real = query_pos, selected, query_real
        self.window, self.blocks, self.query_log_size, self.video = window, blocks, query_log_size, video

    @property
    def query_real(self) -> torch.Tensor:
        """(B, L) bool: the new query rows that hold real tokens."""
        if self._query_real is None:  # (decoding steps: every one)
            self._query_real = torch.ones_like(self.query_pos, dtype=torch.bool)
        return self._query_real

    # -- the slots ---------------------------------------------------------------------------------
    @cached_property
    def _kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._storage.kv()

    @property
    def keys(self) -> torch.Tensor:
        return self._kv[0]

    @property
    def values(self) -> torch.Tensor:
        return self._kv[1]

    @property
    def positions(self) -> torch.Tensor:
        return self._storage.pos

    @property
    def valid(self) -> torch.Tensor:
        return self._storage.valid

    @property
    def state(self):
        return self._storage.state

    @property
    def slots(self) -> int:
        return self._storage.length

    @property
    def n_new(self) -> int:
        return self.queries.shape[2]

    def newest(self) -> torch.Tensor:
        """(B, Hkv, 1): the position of the newest real token."""
        if self._query_real is None:  # decoding: the query rows are real tokens, the newest is the last
            return self.query_pos[:, None, -1:].expand(-1, self.valid.shape[1], -1)
        return self.positions.masked_fill(~self.valid, -1).amax(-1, keepdim=True)

    def recent(self, window: int) -> torch.Tensor:
        """(B, Hkv, N) bool: the ``window`` most recent real tokens (positions of real tokens are consecutive)."""
        return self.valid & (self.positions > self.newest() - window)

    def new_slots(self) -> torch.Tensor:
        """(B, Hkv, N) bool: the slots that hold this call's tokens."""
        return self.recent(self.n_new)

    # -- attention, computed from q and k ------------------------------------------------------------
    def visible(self, start: int = 0, stop: int | None = None, q_len: int | None = None) -> torch.Tensor:
        """(B, Hkv, 1, rows, N) bool: the real, selected slots each query row ``start:stop`` sees, causal by position
        (within the layer's window; both ways within an attention block). ``q_len``: the rows are queries of the
        newest ``q_len`` tokens (default: this call's rows, padding rows see nothing)."""
        q_len = self.n_new if q_len is None else q_len
        stop = q_len if stop is None else stop
        slot_pos, see = self.positions[:, :, None, :], self.valid[:, :, None, :]
        if q_len == self.n_new:
            row_pos = self.query_pos[:, None, start:stop, None]
            see = see & self.query_real[:, None, start:stop, None]
        else:  # the newest q_len tokens have consecutive positions
            row_pos = (self.newest() - q_len + 1 + torch.arange(start, stop, device=slot_pos.device))[..., None]
        order = slot_pos <= row_pos
        if self.blocks is not None and q_len == self.n_new:  # the new tokens are the last slots
            slot_block = torch.full_like(self.valid[:, 0], -1)
            slot_block[:, self.slots - self.n_new:] = self.blocks
            row_block = self.blocks[:, None, start:stop, None]
            order = order | ((row_block == slot_block[:, None, None, :]) & (row_block >= 0))
        see = see & order
        if self.window is not None:
            see = see & (slot_pos > row_pos - self.window)
        if self.selected is not None:
            see = see & self.selected[:, None, None, :]
        return see[:, :, None]

    def rows(self, start: int, stop: int, queries: torch.Tensor | None = None) -> torch.Tensor:
        """Softmax attention of query rows ``start:stop`` over every slot, float32, (B, Hkv, G, rows, N). ``queries``:
        the queries (B, Hq, q, D) of the newest q slots (default: this call's)."""
        queries = self.queries if queries is None else queries
        b, hq, q_len, d = queries.shape
        hkv, n = self.keys.shape[1], self.keys.shape[2]
        q = queries[:, :, start:stop].reshape(b, hkv, hq // hkv, stop - start, d).float()
        upto = n - q_len + stop  # keys after the chunk's last query are never seen: leave them out of the product
        logits = torch.einsum("bhgrd,bhnd->bhgrn", q, self.keys[:, :, :upto].float()) * self.scaling
        see = self.visible(start, stop, q_len)[..., :upto]
        probs = logits.masked_fill(~see, -math.inf).softmax(-1).nan_to_num(0.0)
        return probs if upto == n else torch.nn.functional.pad(probs, (0, n - upto))

    def attention_rows(self, rows: int, queries: torch.Tensor | None = None) -> torch.Tensor:
        """Softmax attention of the last ``rows`` queries (of this call, or ``queries``) over every slot, float32,
        (B, Hkv, G, rows, N)."""
        q_len = (self.queries if queries is None else queries).shape[2]
        return self.rows(q_len - rows, q_len, queries)

    def attention_columns(self) -> torch.Tensor:
        """Attention each slot receives, summed over every new query row, (B, Hkv, G, N); in row chunks."""
        total = 0
        for start in range(0, self.n_new, ROW_CHUNK):
            total = total + self.rows(start, min(start + ROW_CHUNK, self.n_new)).sum(-2)
        return total
