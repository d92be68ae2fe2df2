"""Q-Hitter: A Better Token Oracle for Efficient LLM Inference via Sparse-Quantized KV Cache (Zhang et al., MLSys 2024).

H2O's heavy hitters chosen also for being quantisation-friendly, and every kept token stored in low bit. As the
authors' code (VITA-Group/Q-Hitter at 0e851a5, ``utils/modify_llama.py``; the paper's own definition of the
friendliness metric was not available here): each token's keys and values are quantised per token and head (``bits``,
asymmetric with an integer zero point) as they enter the cache, and its friendliness is 1 − (ẽ_K + ẽ_V)/2, with e the
L2 norm of the quantisation error and ẽ it min-max normalised over the heads and tokens that entered together. From
the prompt of N tokens the cache keeps ⌊``attention_only``·N⌋ tokens by accumulated attention alone, then
⌊(``heavy`` − ``attention_only``)·N⌋ by α·(accumulated attention, min-max normalised over the layer) + (1 − α)·
friendliness, plus the ⌊``recent``·N⌋ newest; the prompt is cut to that right after its attention, then one token goes
per decoding step. GQA: attention summed over the query heads of a KV head (the authors' code is multi-head only).
Differences from their code, by design: it computes errors from the first sequence of a batch only; here each
sequence's own. Its newest key takes part in its own step's attention unquantised and its value quantised; here both
unquantised in that step. ``heavy=1.0`` is the full cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from graphprune.errors import ScheduleError
from graphprune.kv.policy import FULL, CachePolicy, slot_field
from graphprune.ops.quant import dequantize_zero_point, quantize_zero_point
from graphprune.recipes.base import option, register


@dataclass
class Scores:
    acc: object = slot_field("attention each slot has received (summed over the KV head's query heads), (B, Hkv, N)")
    friendly: object = slot_field("quantisation friendliness of each slot when it entered, (B, Hkv, N)")


def normalized(x: torch.Tensor, real: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Min-max normalised over ``dims`` among the ``real`` entries (0 where they are all equal)."""
    lo = x.masked_fill(~real, math.inf).amin(dims, keepdim=True)
    hi = x.masked_fill(~real, -math.inf).amax(dims, keepdim=True)
    return ((x - lo) / (hi - lo)).nan_to_num(0.0, posinf=0.0, neginf=0.0)


def error(x: torch.Tensor, bits: int) -> torch.Tensor:
    """The L2 norm of each vector's quantisation error (per token and head), (B, Hkv, n)."""
    return (dequantize_zero_point(*quantize_zero_point(x.float(), bits), bits) - x.float()).norm(dim=-1)


@register
@dataclass
class QHitter(CachePolicy):
    name = "qhitter"
    summary = "H2O's heavy hitters chosen also for quantisation friendliness; every kept token stored in low bit"
    paper = "Q-Hitter: A Better Token Oracle for Efficient LLM Inference via Sparse-Quantized KV Cache (MLSys 2024)"
    zero = {"heavy": 1.0, "bits": 16}
    State = Scores
    exportable = False  # quantised slots
    slot_order = True  # (slots are compacted in order, as the authors' code does)
    sizes_itself = "keeps shares of the prompt (heavy, recent)"

    budget: float = option(1.0, "Q-Hitter sizes the cache by shares of the prompt: leave budget at 1.0")
    heavy: float = option(0.15, "share of the prompt kept as heavy hitters (attention_only of them by attention "
                                "alone; 1.0: the full cache)")
    attention_only: float = option(0.07, "share of the prompt kept by accumulated attention alone")
    recent: float = option(0.05, "share of the prompt kept as the newest tokens")
    alpha: float = option(0.5, "weight of accumulated attention against quantisation friendliness (1.0: H2O with "
                               "quantisation)")
    bits: int = option(4, "bits of every cached key and value (per token and head); 16: not quantised")

    def validate(self) -> None:
        super().validate()
        for key in ("heavy", "attention_only", "recent", "alpha"):
            if not 0 <= getattr(self, key) <= 1:
                raise ScheduleError(f"{key} must lie in [0, 1], got {getattr(self, key)}")
        if self.attention_only > self.heavy:
            raise ScheduleError("attention_only is part of heavy: it cannot be larger")
        if self.bits not in (2, 3, 4, 8, 16):
            raise ScheduleError(f"bits must be 2, 3, 4, 8 or 16 (no quantisation), got {self.bits}")

    def token_bits(self):
        return None if self.bits == 16 else self.bits

    def sizes(self, prompt_len: int) -> tuple[int, int, int]:
        """Tokens kept by attention alone, by the combined score, and as the newest (the authors' rounding)."""
        n = prompt_len
        return int(self.attention_only * n), int((self.heavy - self.attention_only) * n), int(self.recent * n)

    def capacity(self, layer, n_layers, prompt_len):
        return FULL if self.heavy >= 1.0 else sum(self.sizes(prompt_len))

    def update(self, view):
        st, n = view.state, view.n_new
        cols = view.attention_columns() if view.prefill else view.attention_rows(n).sum(-2)
        cols = cols.sum(2)  # (B, Hkv, N): over the group's query heads
        st.acc = cols if view.prefill else st.acc + cols
        if st.friendly is None:
            st.friendly = torch.zeros_like(st.acc)
        if self.bits < 16:
            new = slice(view.slots - n, view.slots)
            err = error(view.keys[:, :, new], self.bits), error(view.values[:, :, new], self.bits)
            real = view.valid[:, :, new]
            friendly = 1 - (normalized(err[0], real, (1, 2)) + normalized(err[1], real, (1, 2))) / 2
            st.friendly = st.friendly.clone()
            st.friendly[:, :, new] = friendly

    def score(self, view):
        st, valid = view.state, view.valid
        n_attention, _, n_recent = self.sizes(view.prompt_len)
        recent = view.recent(n_recent)
        acc = normalized(st.acc, valid, (1, 2))
        combined = self.alpha * acc + (1 - self.alpha) * st.friendly
        candidates = valid & ~recent
        first = st.acc.masked_fill(~candidates, -math.inf).topk(min(n_attention, valid.shape[-1]), -1).indices
        chosen = torch.zeros_like(valid).scatter(-1, first, True) & candidates
        return combined.masked_fill(chosen, 2.0).masked_fill(recent, math.inf)
