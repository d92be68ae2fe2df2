"""Where a cache layer keeps its slots: one small class per storage strategy.

Every strategy holds keys and values at the model's KV head count, ``(B, Hkv, N, D)``, and per
slot whether it holds a real token (padding and freed slots do not), the position the token was
rotated with, and the per-slot fields of the policy's state. :func:`storage_for` picks one from
what the policy declares:

* :class:`Slots`: appended in order, kept by gathering;
* :class:`Ring`: a policy that evicts every step frees one slot per decoded token, and the next
  token is written into it in place (no copy of the cache per step; order is read from positions);
* :class:`Static`: a fixed slot count (capacity + extra, empty slots first): static shapes for export;
* :class:`Quantized`: KIVI's quantised codes plus a full-precision residual.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from graphprune.kv.policy import FULL, CachePolicy, Chunk, Codec, When, is_slot_field
from graphprune.ops.quant import dequantize_zero_point, quantize_zero_point


DEFERRED = 64  # decoding steps whose slot descriptions may wait for one concatenation
GROW = 32  # a growing cache allocates 1/GROW of its length in spare slots at once: decoding appends in place (not a
# copy of the cache per token, as concatenating does) for at most 1/GROW more memory (a cache under GROW slots has no
# spare slot and is copied per token)


def _append(grown: tuple[torch.Tensor, torch.Tensor] | None, t: torch.Tensor,
            new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` with ``new`` appended along dim 2, as ``(buffer, t')``: ``t'`` is a prefix view of ``buffer``. ``grown``:
    the last ``(buffer, t')`` made for this tensor; when ``t`` is still that ``t'`` and the buffer has room, ``new``
    is written in place; otherwise into a new buffer with ``(n + m) // GROW`` spare slots. (Slots past a view's end
    are never visible through it, so earlier views stay valid.)"""
    n, m = t.shape[2], new.shape[2]
    if grown is not None and grown[1] is t and grown[0].shape[2] >= n + m and _writable(grown[0]):
        buf = grown[0]
    else:
        buf = t.new_empty(*t.shape[:2], n + m + (n + m) // GROW, *t.shape[3:])
        buf.narrow(2, 0, n).copy_(t)
    buf.narrow(2, n, m).copy_(new)
    return buf, buf.narrow(2, 0, n + m)


def _writable(t: torch.Tensor) -> bool:
    """Whether ``t`` takes in-place writes here: not a tensor made under inference mode, unless that mode is on."""
    return not t.is_inference() or torch.is_inference_mode_enabled()


def _per_slot(idx: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Slot indices ``idx`` (B, Hkv, k) expanded over the trailing dimensions of ``t`` (B, Hkv, N, ...)."""
    return idx.reshape(*idx.shape, *([1] * (t.dim() - 3))).expand(*idx.shape, *t.shape[3:])


def ranked(scores: torch.Tensor, valid: torch.Tensor | None, protect: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 scores with protected real slots at +inf and slots without a real token at -inf (``valid`` None: every
    slot holds one)."""
    s = scores.to(torch.float32)
    if protect is not None:
        s = s.masked_fill(protect if valid is None else protect & valid, math.inf)
    return s if valid is None else s.masked_fill(~valid, -math.inf)


def top(scores: torch.Tensor, valid: torch.Tensor | None, k: int, protect: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted indices (B, Hkv, k) of the ``k`` best slots: protected ones first, invalid ones last; of tied scores the
    earlier slots (torch.topk would take any: a left-padded row could then keep other tokens than its prompt alone,
    e.g. on the plateaus of max-pooled votes)."""
    s = ranked(scores, valid, protect)
    if k == s.shape[-1] - 1:  # one slot goes: an argmin, not a sort
        return all_but(s.argmin(-1), k + 1)
    if torch.compiler.is_exporting():  # ONNX's TopK takes the lower index of equal scores, as the stable sort does
        return s.topk(k, dim=-1).indices.sort(dim=-1).values
    return s.argsort(dim=-1, descending=True, stable=True)[..., :k].sort(dim=-1).values


def all_but(slot: torch.Tensor, n: int) -> torch.Tensor:
    """Sorted indices (B, Hkv, n - 1) of every slot but ``slot`` (B, Hkv)."""
    idx = torch.arange(n - 1, device=slot.device)
    return idx + (idx >= slot[..., None])


class _Described:
    """A per-slot tensor of :class:`Slots` that the noted slot descriptions are settled into before it is read or
    replaced."""

    def __init__(self, attr: str, doc: str):
        self.attr, self.__doc__ = attr, doc

    def __get__(self, st, owner=None):
        if st is None:
            return self
        if st._described:
            st._settle_described()
        return getattr(st, self.attr)

    def __set__(self, st, t) -> None:
        if st._described:
            st._settle_described()
        setattr(st, self.attr, t)


class Slots:
    """Plain storage: new slots are appended, eviction gathers the kept ones in order."""

    def __init__(self, state=None):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self._valid: torch.Tensor | None = None  # (B, Hkv, N) bool
        self._pos: torch.Tensor | None = None  # (B, Hkv, N) long: position each key was rotated with
        self._described: list[tuple[torch.Tensor | None, torch.Tensor]] = []  # newest slots' (real, pos), not yet in
        self.state = state  # the policy's state dataclass (or None)
        self.padded: bool | None = None  # some slot holds no real token (None: not known, see all_real)
        self._grown: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # growth buffers and their prefix views

    # -- writing --------------------------------------------------------------------------------
    def write(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store the new tokens' keys and values."""
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys, self.values = self._grow("keys", self.keys, keys), self._grow("values", self.values, values)

    def _grow(self, name: str, t: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        self._grown[name] = grown = _append(self._grown.get(name), t, new)
        return grown[1]

    def _concatenate(self, name: str, t: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, new], dim=2)

    def describe(self, real: torch.Tensor | None, pos: torch.Tensor) -> None:
        """Describe the newest slots: which hold real tokens (B, n; None: all of them) and their positions (B, n).
        Decoding steps only note them: validity and positions are brought up to date when next read (a policy that
        does not evict while decoding reads neither)."""
        if real is not None and self.padded is False:
            self.padded = None  # (known again when all_real asks)
        self._described.append((real, pos))
        if self._valid is None or len(self._described) >= DEFERRED:
            self._settle_described()
        for name, t in self.slot_fields():  # the policy's per-slot state: new slots start at zero
            grow = self.length - t.shape[2]
            if grow > 0:
                setattr(self.state, name, torch.cat([t, t.new_zeros(*t.shape[:2], grow, *t.shape[3:])], dim=2))

    def _settle_described(self) -> None:
        described, self._described = self._described, []
        pos = torch.cat([p for _, p in described], -1) if len(described) > 1 else described[0][1]
        real = [torch.ones_like(p, dtype=torch.bool) if r is None else r for r, p in described]
        real = torch.cat(real, -1) if len(real) > 1 else real[0]
        b, hkv, n = self.keys.shape[0], self.keys.shape[1], pos.shape[-1]
        real, pos = real[:, None].expand(b, hkv, n), pos[:, None].expand(b, hkv, n)
        if self._valid is None:
            self._valid, self._pos = real, pos
        else:
            self._valid, self._pos = self._grow("valid", self._valid, real), self._grow("pos", self._pos, pos)

    valid = _Described("_valid", "(B, Hkv, N) bool: the slots that hold a real token.")
    pos = _Described("_pos", "(B, Hkv, N) long: the position each slot's key was rotated with.")

    def settle(self, capacity: int | None) -> None:
        """After the call's eviction (quantised storage compresses, static storage pads)."""

    # -- reading --------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every cached key and value, in full precision, (B, Hkv, N, D) each."""
        return self.keys, self.values

    @property
    def nbytes(self) -> int:
        """Bytes held for keys and values, spare slots of the growth buffers included (bookkeeping excluded)."""
        held = [self._held(name) for name in ("keys", "values")]
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def _held(self, name: str) -> torch.Tensor | None:
        """The tensor holding ``name``'s memory: its growth buffer while it is the buffer's prefix."""
        t, grown = getattr(self, name), self._grown.get(name)
        return grown[0] if grown is not None and grown[1] is t else t

    def all_real(self) -> bool:
        """Whether every slot holds a real token (then attention needs no mask)."""
        if self.padded is None:
            self.padded = not bool(self.valid.all())
        return not self.padded

    def forget(self, slots: torch.Tensor) -> None:
        """Mark the slots ``slots`` (B, Hkv, N) bool as holding no real token."""
        self.valid, self.padded = self.valid & ~slots, None

    def remove(self, slots: torch.Tensor) -> None:
        """Forget the slots ``slots`` (B, Hkv, N) bool and give up the room no sequence and head needs any more (the
        others stay in order)."""
        self.forget(slots)
        k = max(int(self.valid.sum(-1).max()), 1)
        if k < self.length:
            self.keep(self.valid.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[..., :k].sort(-1).values)

    def writable(self) -> None:
        """Before writing in place: tensors made under inference mode (a prompt run in it) are copied once when the
        cache goes on outside it."""
        if self.keys is not None and not all(_writable(t) for t in (
                self.keys, self.values, self.valid, self.pos, *(t for _, t in self.slot_fields()))):
            self._slots(torch.clone)

    def slot_fields(self):
        if self.state is None:
            return []
        return [(f.name, getattr(self.state, f.name)) for f in dataclasses.fields(self.state)
                if is_slot_field(f) and getattr(self.state, f.name) is not None]

    # -- eviction and batch operations ------------------------------------------------------------
    def _slots(self, fn) -> None:
        """Apply ``fn`` to every per-slot tensor: keys, values, validity, positions, the policy's slot fields."""
        self._grown.clear()  # (the growth buffers go with the old tensors)
        for name, t in self.slot_fields():
            setattr(self.state, name, fn(t))
        self.keys, self.values = fn(self.keys), fn(self.values)
        self.valid, self.pos = fn(self.valid), fn(self.pos)
        self.padded = None

    def keep(self, idx: torch.Tensor) -> None:
        """Keep the slots ``idx`` (B, Hkv, C), which must be sorted, in that order."""
        self._slots(lambda t: t.gather(2, _per_slot(idx, t)))

    def drop(self, slot: torch.Tensor) -> None:
        """Evict one slot per sequence and KV head, ``slot`` (B, Hkv)."""
        self.keep(all_but(slot, self.length))

    def pad(self, n: int) -> None:
        """Add ``n`` empty slots before the others."""
        self._slots(lambda t: torch.cat([t.new_zeros(*t.shape[:2], n, *t.shape[3:]), t], dim=2))

    def map(self, fn) -> None:
        """Apply a batch operation (beam reorder, repeat, select) to everything held."""
        if self.keys is None:
            return
        self._slots(fn)
        if self.state is not None:
            for f in dataclasses.fields(self.state):
                t = getattr(self.state, f.name)
                if isinstance(t, torch.Tensor) and not is_slot_field(f):
                    setattr(self.state, f.name, fn(t))


class Ring(Slots):
    """A policy that evicts at every step frees one slot per decoded token; the next token takes it in place."""

    def __init__(self, state=None):
        super().__init__(state)
        self.hole: torch.Tensor | None = None  # (B, Hkv): the freed slot of each sequence and head
        self.refill = False  # every other slot holds a real token

    _grow = Slots._concatenate  # appends are rare here (a call of several tokens): no spare slots

    def write(self, keys, values):
        if self.hole is not None and keys.shape[-2] == 1:
            self.writable()
            idx = self.hole[:, :, None, None].expand(*self.hole.shape, 1, keys.shape[-1])
            self.keys.scatter_(2, idx, keys)
            self.values.scatter_(2, idx, values)
        else:
            self.hole = None  # several tokens at once: append (the freed slot stays empty)
            super().write(keys, values)

    def describe(self, real, pos):
        if self.hole is None:
            return super().describe(real, pos)
        self.writable()
        b, hkv = self.hole.shape
        hole, self.hole = self.hole[..., None], None
        self.padded = False if real is None and self.refill else None
        if real is None:
            real = torch.ones_like(pos, dtype=torch.bool)
        self.valid.scatter_(2, hole, real[:, None].expand(b, hkv, 1))
        self.pos.scatter_(2, hole, pos[:, None].expand(b, hkv, 1))
        for _, t in self.slot_fields():
            t.scatter_(2, _per_slot(hole, t), 0)

    def drop(self, slot):
        """Mark the slot free; the next token is written into it."""
        self.writable()
        if not (self.valid.is_contiguous() and self.pos.is_contiguous()):  # expanded views of the prompt's
            self.valid, self.pos = self.valid.contiguous(), self.pos.contiguous()
        self.hole = slot
        self.valid.scatter_(2, slot[..., None], False)
        self.refill, self.padded = self.padded is False, True  # (refill: all real again once the hole is filled)

    def map(self, fn):
        super().map(fn)
        if self.hole is not None:
            self.hole = fn(self.hole)


class Static(Slots):
    """A fixed number of slots, capacity + ``extra``: empty slots go first; real tokens are never dropped for them."""

    def __init__(self, state=None, extra: int = 0):
        super().__init__(state)
        self.extra = extra

    _grow = Slots._concatenate  # traced for export: no buffers

    def settle(self, capacity):
        slots = (self.length if capacity >= FULL else capacity) + self.extra  # (a full cache: the prompt's tokens)
        if self.length < slots:
            self.pad(slots - self.length)
        elif self.length > slots:
            self.keep(top(torch.zeros_like(self.pos, dtype=torch.float32), self.valid, slots, protect=self.valid))

    def all_real(self) -> bool:
        return False  # exported graphs may not branch on the data: always masked

    def remove(self, slots):
        self.forget(slots)  # (the slot count stays: settle() sizes the layer)

    def load(self, keys, values, valid, pos) -> None:
        self.keys, self.values, self.valid, self.pos = keys, values, valid, pos


class Compressed(Slots):
    """Storage in compressed chunks (the policy's :class:`~graphprune.kv.policy.Codec`: KIVI, GEAR). ``keys`` /
    ``values`` hold the newest tokens in full precision; the older ones live in ``kq`` / ``vq``, chunks oldest first,
    compressed when the codec says so and never again."""

    _grow = Slots._concatenate  # the full-precision part is small, sliced off as it is compressed

    def __init__(self, state=None, codec: Codec | None = None):
        super().__init__(state)
        self.codec = codec
        self.kq: list[Chunk] = []
        self.vq: list[Chunk] = []
        self.nk = self.nv = 0  # tokens in the compressed parts
        self.prompted = False  # the prompt's tokens were offered to the codec

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.nk + self.keys.shape[-2]

    @property
    def nbytes(self) -> int:
        held = [t for t in (self.keys, self.values) if t is not None]
        return sum(c.nbytes for c in self.kq + self.vq) + sum(t.numel() * t.element_size() for t in held)

    def kv(self):
        return torch.cat([*self._decoded(self.kq), self.keys], dim=-2), \
            torch.cat([*self._decoded(self.vq), self.values], dim=-2)

    def _decoded(self, chunks: list[Chunk]) -> list[torch.Tensor]:
        out, start, pos = [], 0, self.pos
        for c in chunks:
            x = c.decode(pos[..., start:])  # (each chunk takes the positions it needs from its start)
            out.append(x.to(self.keys.dtype))
            start += x.shape[-2]
        return out

    def settle(self, capacity):
        prompt, self.prompted = not self.prompted, True
        for keys in (True, False):
            held = self.keys if keys else self.values
            n = self.codec.due(held.shape[-2], keys)
            if n:
                start = self.nk if keys else self.nv
                chunk = self.codec.encode(held[..., :n, :], self.valid[..., start:start + n],
                                          self.pos[..., start:start + n], keys, prompt)
                chunks = self.kq if keys else self.vq
                joined = self.codec.join(chunks[-1], chunk) if chunks else None
                if joined is not None:
                    chunks[-1] = joined
                else:
                    chunks.append(chunk)
                if keys:
                    self.keys, self.nk = self.keys[..., n:, :], self.nk + n
                else:
                    self.values, self.nv = self.values[..., n:, :], self.nv + n

    def keep(self, idx):
        raise NotImplementedError("compressed storage never evicts")

    def map(self, fn):
        super().map(fn)
        self.kq = [c.map(fn) for c in self.kq]
        self.vq = [c.map(fn) for c in self.vq]


class TokenCodes(Slots):
    """Every token's keys and values quantised per token and KV head (``bits``, integer zero point): ``codes`` (keys
    and values packed side by side) and ``stats`` (scale and zero of each) are per-slot tensors, so slots are evicted as
    plain ones. ``keys`` / ``values`` hold the tokens written in the current call, in full precision, until the slots
    are next rearranged or settled."""

    _grow = Slots._concatenate

    def __init__(self, state=None, bits: int = 4):
        super().__init__(state)
        self.bits = bits
        self.codes: torch.Tensor | None = None  # (B, Hkv, N, 2·D·bits/8)
        self.stats: torch.Tensor | None = None  # (B, Hkv, N, 4): key scale, key zero, value scale, value zero

    @property
    def length(self) -> int:
        coded = 0 if self.codes is None else self.codes.shape[2]
        return coded + (0 if self.keys is None else self.keys.shape[2])

    def _flush(self) -> None:
        if self.keys is None or self.keys.shape[2] == 0:
            return
        kc, ks, kz = quantize_zero_point(self.keys.float(), self.bits)
        vc, vs, vz = quantize_zero_point(self.values.float(), self.bits)
        codes, stats = torch.cat([kc, vc], -1), torch.cat([ks, kz.float(), vs, vz.float()], -1).to(self.keys.dtype)
        self.codes = codes if self.codes is None else torch.cat([self.codes, codes], 2)
        self.stats = stats if self.stats is None else torch.cat([self.stats, stats], 2)
        self.keys, self.values = self.keys[:, :, :0], self.values[:, :, :0]

    def kv(self):
        if self.codes is None:
            return self.keys, self.values
        half = self.codes.shape[-1] // 2
        s = self.stats
        keys = dequantize_zero_point(self.codes[..., :half], s[..., 0:1], s[..., 1:2], self.bits).to(self.keys.dtype)
        values = dequantize_zero_point(self.codes[..., half:], s[..., 2:3], s[..., 3:4], self.bits).to(self.keys.dtype)
        return torch.cat([keys, self.keys], 2), torch.cat([values, self.values], 2)

    def settle(self, capacity):
        self._flush()

    def _slots(self, fn) -> None:
        self._flush()
        for name, t in self.slot_fields():
            setattr(self.state, name, fn(t))
        self.codes, self.stats = fn(self.codes), fn(self.stats)
        self.valid, self.pos = fn(self.valid), fn(self.pos)
        self.padded = None

    def writable(self) -> None:
        pass  # (nothing is written in place)

    @property
    def nbytes(self) -> int:
        held = [t for t in (self.codes, self.stats, self.keys, self.values) if t is not None]
        return sum(t.numel() * t.element_size() for t in held)


def storage_for(policy: CachePolicy, static: int | None = None, codec: Codec | None = None) -> Slots:
    """The storage a policy's layer uses: static slots for export (``static`` extra slots), compressed chunks when the
    layer has a ``codec``, a ring when the policy evicts at every step, plain slots otherwise."""
    state = policy.new_state()
    if static is not None:
        return Static(state, static)
    if codec is not None:
        return Compressed(state, codec)
    if policy.token_bits() is not None:
        return TokenCodes(state, policy.token_bits())
    in_place = policy.evicts is When.STEP and not policy.slot_order and not policy.prunes_rows
    return Ring(state) if in_place else Slots(state)
