"""What a cache policy is: the one extension point of the decoder side.

A policy decides which cached tokens a decoder keeps. The smallest one only ranks slots::

    @graphprune.register
    @dataclass
    class KeyNorm(CachePolicy):
        name = "key_norm"
        summary = "keep the keys of smallest norm"
        paper = "-"

        def score(self, view):
            return -view.keys.norm(dim=-1)      # (B, Hkv, N): higher is kept

The cache layer does everything else: it protects the policy's sink and recent tokens,
keeps the top ``capacity`` slots per KV head, reuses the freed slot while decoding, pads to
static shapes for export, and keeps each slot's validity and position. A policy with running
scores declares a ``State`` dataclass; its fields made with :func:`slot_field` are per-slot
tensors ``(B, Hkv, N, ...)`` that follow the slots through every eviction (new slots start at
zero), the others are per-sequence tensors ``(B, ...)``. The policy reads and updates it as
``view.state`` in :meth:`CachePolicy.update`.

Importing this module does not need transformers.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, Union

import torch

from graphprune.errors import RecipeError, ScheduleError
from graphprune.recipes.base import Recipe, option

if TYPE_CHECKING:
    from graphprune.kv.images import ImageView, VideoView
    from graphprune.kv.model import DecoderInfo
    from graphprune.kv.rows import LayerRows
    from graphprune.kv.view import View

FULL = 2**62  # the capacity of a full cache


class When(enum.Enum):
    """When a policy evicts: after every step, once after the prompt (then the cache grows), or never."""

    STEP = "step"
    PROMPT = "prompt"
    NEVER = "never"


@dataclass(frozen=True)
class Chunk:
    """A compressed run of cached keys or values: the tensors held (each with the batch first) and the function that
    rebuilds the (B, Hkv, n, D) entries from them and the run's positions (B, Hkv, n)."""

    parts: tuple
    rebuild: Callable[..., torch.Tensor]

    def decode(self, pos: torch.Tensor) -> torch.Tensor:
        return self.rebuild(*self.parts, pos=pos)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts)

    def map(self, fn) -> "Chunk":
        return Chunk(tuple(fn(t) for t in self.parts), self.rebuild)


class Codec:
    """How a policy stores a layer's cache compressed (KIVI, GEAR, Palu): the oldest full-precision tokens go, a run at
    a time, into :class:`Chunk` s that are never compressed again; attention reads them rebuilt."""

    def join(self, last: Chunk, new: Chunk) -> Chunk | None:
        """One chunk for ``last`` followed by ``new`` (codecs that compress every token as it comes: one chunk instead
        of one per step); None: they stay two."""
        return None

    def due(self, held: int, keys: bool) -> int:
        """How many of the ``held`` full-precision keys (or values), oldest first, to compress now (0: none)."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor, valid: torch.Tensor, pos: torch.Tensor, keys: bool, prompt: bool) -> Chunk:
        """Compress ``x`` (B, Hkv, n, D), keys (rotated by RoPE with positions ``pos`` (B, Hkv, n)) or values;
        ``valid`` (B, Hkv, n) the real tokens (padding takes no part in the statistics); ``prompt``: this run comes
        from the prompt pass."""
        raise NotImplementedError


@dataclass(frozen=True)
class KeyOverride:
    """Keys that attention uses instead of the cached ones, for a few slots: ``slots`` (B, Hkv, k), ``keys``
    (B, Hkv, k, D)."""

    slots: torch.Tensor
    keys: torch.Tensor


@dataclass(frozen=True)
class MergedRows:
    """What a policy makes of the rows entering a layer (:meth:`CachePolicy.merge_rows`): their new hidden states
    ``hidden`` (B, R, C), which go on ``keep`` (B, R) bool (the others stop here, as :meth:`CachePolicy.rows` stops
    them), and the log of how many tokens each stands for ``log_size`` (B, R) (0: itself), which its key adds to every
    later attention logit (proportional attention)."""

    hidden: torch.Tensor
    keep: torch.Tensor
    log_size: torch.Tensor


def slot_field(help: str = ""):  # noqa: A002
    """A field of a policy's ``State`` holding one entry per cached slot, ``(B, Hkv, N, ...)``; it follows the slots."""
    return dataclasses.field(default=None, metadata={"slots": True, "help": help})


def is_slot_field(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("slots"))


@dataclass
class CachePolicy(Recipe):
    """Base class of the KV-cache recipes (see the module docstring)."""

    kind: ClassVar[str] = "cache"
    zero: ClassVar[dict] = {"budget": 1.0}
    evicts: ClassVar[When] = When.STEP
    State: ClassVar[type | None] = None  # the policy's running state (a dataclass), or None
    exportable: ClassVar[bool] = True  # a fixed budget gives static cache shapes (ONNX decode step)
    slot_order: ClassVar[bool] = False  # reads slot indices as cache order (then freed slots are not reused in place)
    revives: ClassVar[bool] = False  # rows stopped by rows() keep their hidden states and may come back later
    sizes_itself: ClassVar[str | None] = None  # a policy sized by its own options says how (then budget stays 1.0)
    needs_images: ClassVar[bool] = False  # it prunes image tokens (``view.visual``): vision-language models only
    needs_class_token: ClassVar[bool] = False  # it reads the vision tower's class token over one grid of patches per
    # image (``ImageView.vision``): LLaVA-1.5 only

    budget: Union[int, float] = option(
        0.5, "cached tokens per layer: an int, or a fraction in (0, 1) of the prompt length (1.0: keep everything)")

    # -- options ------------------------------------------------------------------------------
    def validate(self) -> None:
        b = self.budget
        if self.sizes_itself is not None and b != 1.0:
            raise ScheduleError(f"{self.name} {self.sizes_itself}: leave budget at 1.0")
        if isinstance(b, bool) or not isinstance(b, (int, float)):
            raise ScheduleError(f"budget must be an int (tokens) or a float in (0, 1) (fraction of the prompt; 1.0: full cache), got {b!r}")
        if isinstance(b, int) and b < self.min_budget():
            raise ScheduleError(f"budget={b} is too small for {self.name}: it needs at least {self.min_budget()} tokens "
                                f"({self.min_budget_reason()})")
        if isinstance(b, float) and not 0 < b <= 1:
            raise ScheduleError(f"a fractional budget must lie in (0, 1) (1.0: the full cache), got {b}; give an int for a token count")

    def options(self) -> dict:
        """The options as reports show them; an array option (calibration token ids) by its shape, not its values."""
        def shown(v):
            nested = isinstance(v, (list, tuple)) and v and isinstance(v[0], (list, tuple, torch.Tensor))
            return f"{tuple(torch.as_tensor(v).shape)} array" if isinstance(v, torch.Tensor) or nested else v
        return {k: shown(v) for k, v in super().options().items() if k != "restore_tokens"}

    @classmethod
    def describe_options(cls) -> list[tuple[str, str, str]]:
        return [o for o in super().describe_options() if o[0] != "restore_tokens"]

    def fit(self, n_layers: int) -> None:
        """Refuse options that do not fit a model of ``n_layers`` layers (raise :class:`ScheduleError`)."""

    def min_budget(self) -> int:
        return 1

    def min_budget_reason(self) -> str:
        return "one cached token"

    def apply(self, graph):  # cache policies act on decoders through graphprune.kv, not on encoder graphs
        raise RecipeError(f"'{self.name}' is a KV-cache recipe for decoder LLMs (Llama, Qwen2/3, Mistral); "
                          "this model is not one")

    # -- sizing -------------------------------------------------------------------------------
    def tokens(self, prompt_len: int) -> int:
        """The uniform per-layer budget for a prompt of ``prompt_len`` tokens (padding included)."""
        if self.budget == 1.0 and isinstance(self.budget, float):
            return FULL
        if isinstance(self.budget, float):
            return max(self.min_budget(), int(self.budget * prompt_len))
        return self.budget

    def capacity(self, layer: int, n_layers: int, prompt_len: int) -> int | None:
        """Slots layer ``layer`` keeps; uniform unless the policy says otherwise. None: no fixed size, the policy's
        scores decide (slots it scores ``-inf`` go, all others stay)."""
        return self.tokens(prompt_len)

    # -- what the cache layer protects ---------------------------------------------------------
    def sink_tokens(self) -> int:
        """How many of the first tokens (by position) are never evicted."""
        return 0

    def recent_tokens(self, capacity: int) -> int:
        """How many of the most recent tokens are never evicted, at this capacity."""
        return 0

    # -- ranking ------------------------------------------------------------------------------
    def update(self, view: "View") -> None:
        """Update the running state ``view.state`` with the new queries (called after every attention call)."""

    def score(self, view: "View") -> torch.Tensor:
        """(B, Hkv, N): the value of each slot (higher is kept; ``-inf``: must go). Padding and protected slots
        are handled by the cache layer."""
        raise NotImplementedError(f"{type(self).__name__} must define score(view)")

    # -- optional stages ----------------------------------------------------------------------
    def codec(self) -> Codec | None:
        """Store the cache compressed (quantised: KIVI, GEAR) instead of in full precision; None: full precision."""
        return None

    def token_bits(self) -> int | None:
        """Store every token's keys and values quantised to this many bits (per token and KV head, asymmetric with an
        integer zero point), the slots still evictable (Q-Hitter); None: as the codec says. A policy's own scores see
        the newest tokens' exact keys and values in the call that brings them."""
        return None

    def layer_codecs(self, model, info: "DecoderInfo") -> tuple[Codec | None, ...]:
        """Each layer's codec, made once from the model (its weights: Palu's projections); ``model`` is graphprune's
        copy of the decoder before its attention is taken over (read it, run it; its weights are the user's). Default:
        :meth:`codec` for every layer."""
        return (self.codec(),) * info.n_layers

    def attention_keys(self, view: "View") -> KeyOverride | None:
        """While decoding, keys that attention uses instead of the cached ones for a few slots (StreamingLLM turns its
        sink keys); None: the cached keys."""
        return None

    def attention_slots(self, view: "View") -> torch.Tensor | None:
        """While decoding, the slots this step's attention reads, (B, Hkv, N) bool (exact attention over those alone:
        sparse attention; the cache keeps every slot); None: all of them."""
        return None

    def rows(self, view: "View") -> torch.Tensor | None:
        """Row pruning at a layer boundary (in every forward): (B, N) bool over this layer's slots, the tokens that
        stop here and are left out of the layers above in this forward; None: all go on. Hidden states, positions,
        masks and the cache of later layers follow (:mod:`graphprune.kv.rows`)."""
        return None

    def merge_rows(self, rows: "LayerRows") -> MergedRows | None:
        """Before a decoder layer, in the prompt pass (on the prompt-rows stage): rows that merge into others, and the
        merged rows' new hidden states; None: the rows go on as they are."""
        return None

    def renumber(self, view: "View") -> torch.Tensor | None:
        """New positions (B, L) for this call's rows from this layer on (after :meth:`rows_before`; the stopped rows'
        are ignored): this layer's queries and keys, and the rows' rotary embeddings for the layers above, turn to
        them (RoPE: a rotation by the difference); None: the rows keep theirs. (PyramidDrop's code renumbers.)"""
        return None

    def attention_bias(self, view: "View") -> torch.Tensor | None:
        """An additive bias (B, Hkv, N) on every attention logit of each cached slot, in this layer's attention
        (called once per attention call, before it); None: none. The log sizes of merged rows
        (``view.query_log_size``) are what proportional attention adds."""
        return None

    def image_tokens(self, image: "ImageView") -> torch.Tensor | None:
        """Before a vision-language model's language model: which of one image's projected tokens
        ``image.features`` (n, C) go in, as sorted indices (k,); None: all of them (:mod:`graphprune.kv.images`)."""
        return None

    def fixed_image_tokens(self, features: torch.Tensor) -> torch.Tensor | None:
        """:meth:`image_tokens` for a batch of images of one size ``features`` (N, n, C), keeping the same number of
        tokens of each (a static shape: what exports to ONNX with the vision tower): sorted indices (N, k); None: the
        policy's count depends on the data (it does not export)."""
        return None

    def image_encoder(self, model) -> Callable[[torch.Tensor], list[torch.Tensor]] | None:
        """Before the language model: an image encoder made once from graphprune's copy of the vision-language model
        (read it, run it; its weights are the user's), which takes the call's pixel values (N, 3, H, W) and gives each
        image's tokens for the language model, (k_i, C) each, fewer than its placeholders: they take the first k_i
        places, the rest leave the prompt (an encoder recipe inside the vision tower, :mod:`graphprune.kv.tower`); None: the
        model's own encoder."""
        return None

    def video_tokens(self, video: "VideoView") -> torch.Tensor | None:
        """Before a vision-language model's language model: which of one video's projected tokens ``video.features``
        (n, C; ``video.frames`` frames of equal size) go in, as sorted indices (k,); None: all of them."""
        return None

    def merge_image(self, image: "ImageView") -> torch.Tensor | None:
        """Before the language model: new tokens (k, C) that take one image's place (they close up: merged tokens have
        no positions of their own); None: the image as :meth:`image_tokens` leaves it."""
        return None

    def renumbers(self) -> bool:
        """Whether the tokens left by :meth:`image_tokens` close up their positions (the sequence is shorter) instead of
        keeping them (merged tokens always do)."""
        return type(self).merge_image is not CachePolicy.merge_image

    @property
    def reduces_images(self) -> bool:
        """Whether the policy reduces image tokens before the language model (:meth:`image_tokens`, :meth:`merge_image`)."""
        return type(self).image_tokens is not CachePolicy.image_tokens or \
            type(self).merge_image is not CachePolicy.merge_image

    @property
    def reduces_videos(self) -> bool:
        """Whether the policy reduces video tokens before the language model (:meth:`video_tokens`)."""
        return type(self).video_tokens is not CachePolicy.video_tokens

    def rows_before(self, view: "View") -> torch.Tensor | None:
        """Row pruning before this layer's attention (in every forward), scored with this layer's own queries and keys
        of all the rows that reached it: (B, N) bool over this layer's slots, the tokens that stop before this layer
        (it holds no keys and values for them, its attention leaves them out); None: all go on."""
        return None

    def image_rows_after(self, n: int, layer: int, n_layers: int) -> int | None:
        """How many of a sequence's ``n`` image tokens are still rows after decoder layer ``layer`` of the prompt pass,
        when that count is fixed by the options alone (FastV, PyramidDrop): what a static export of the prompt pass
        compacts its rows to. None: the count depends on the data (the policy's rows do not export)."""
        return None if self.prunes_rows else n

    @property
    def prunes_rows(self) -> bool:
        """Whether the policy prunes prompt rows at layer boundaries (it defines :meth:`rows`, :meth:`rows_before` or
        :meth:`merge_rows`)."""
        return type(self).rows is not CachePolicy.rows or type(self).rows_before is not CachePolicy.rows_before or \
            type(self).merge_rows is not CachePolicy.merge_rows

    @property
    def merges_rows(self) -> bool:
        """Whether the policy merges prompt rows (:meth:`merge_rows`)."""
        return type(self).merge_rows is not CachePolicy.merge_rows

    def new_state(self):
        return None if self.State is None else self.State()



def group_mean(rows: torch.Tensor) -> torch.Tensor:
    """Scores of the query heads that share a KV head, averaged: (B, Hkv, G, ...) → (B, Hkv, ...)."""
    return rows.mean(dim=2)
