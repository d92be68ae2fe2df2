"""FastGen: Model Tells You What to Discard: Adaptive KV Cache Compression for LLMs (Ge et al., ICLR 2024)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from graphprune.errors import ScheduleError
from graphprune.kv.policy import CachePolicy, group_mean, slot_field
from graphprune.recipes.base import option, register

POLICIES = ("special", "special+punct", "special+punct+frequent", "special+punct+frequent+local", "full")


def token_sets(tokenizer) -> dict:
    """``special_ids`` and ``punct_ids`` for a Hugging Face tokenizer: its special tokens, and every vocabulary entry
    made of punctuation (and the tokenizer's space markers) only."""
    import string

    special = sorted(set(tokenizer.all_special_ids))
    marks = set(string.punctuation)
    punct = [i for tok, i in tokenizer.get_vocab().items()
             if i not in special and tok.strip(" Ġ▁Ċ\n\t") and set(tok.strip(" Ġ▁Ċ\n\t")) <= marks]
    return {"special_ids": special, "punct_ids": sorted(punct)}


@dataclass
class Profile:
    tok: object = slot_field("token id of each slot")
    acc: object = slot_field("attention each slot has received")
    seen: object = slot_field("queries that have seen each slot")
    length: object = None  # (B,) tokens of each sequence so far (padding aside)
    window: object = None  # (B,) the local window, ⌈r_l · prompt length⌉
    policy: object = None  # (B, Hkv) index into POLICIES of each head


@register
@dataclass
class FastGen(CachePolicy):
    name = "fastgen"
    summary = "profile each head on the prompt, give it the cheapest policy keeping ≥ T of its attention"
    paper = "Model Tells You What to Discard: Adaptive KV Cache Compression for LLMs (ICLR 2024)"
    zero = {"recovery": 1.0}
    State = Profile
    exportable = False  # heads keep different, changing numbers of tokens
    sizes_itself = "sizes each head's cache by its profiled policy (tune recovery)"

    budget: float = option(1.0, "FastGen sizes each head's cache by its profiled policy: leave budget at 1.0")
    recovery: float = option(0.95, "T: share of each head's prompt attention its policy must keep (1.0: full cache)")
    local: float = option(0.3, "r_l: the local window, a fraction of the prompt length")
    frequent: float = option(0.3, "r_f: heavy hitters kept, a fraction of the current length")
    special_ids: list = option([], "token ids of special tokens (BOS, EOS, chat markers); token_sets(tokenizer) gives both")
    punct_ids: list = option([], "token ids of punctuation tokens")

    def validate(self) -> None:
        super().validate()
        if not 0 < self.recovery <= 1 or not 0 <= self.local <= 1 or not 0 <= self.frequent <= 1:
            raise ScheduleError("recovery must lie in (0, 1], local and frequent in [0, 1]")

    def capacity(self, layer, n_layers, prompt_len):
        return None  # each head's policy decides

    # -- the parts of a policy ------------------------------------------------------------------
    def _tokens(self, view):
        ids = view.state.tok
        special = torch.isin(ids, torch.tensor(self.special_ids, dtype=ids.dtype, device=ids.device))
        punct = torch.isin(ids, torch.tensor(self.punct_ids, dtype=ids.dtype, device=ids.device))
        return special & view.valid, punct & view.valid

    def _frequent(self, view, protected):
        """(B, Hkv, N): the top ⌈r_f · length⌉ tokens by mean received attention, besides ``protected``."""
        st = view.state
        score = (st.acc / st.seen.clamp(min=1)).masked_fill(protected | ~view.valid, -math.inf)
        count = torch.ceil(self.frequent * st.length)[:, None, None]  # r_f × the tokens seen so far
        rank = score.argsort(-1, descending=True).argsort(-1)
        return (rank < count) & view.valid & ~protected

    def _masks(self, view) -> list[torch.Tensor]:
        """Keep-masks of the five policies (cumulative), (B, Hkv, N) each; local is per current token."""
        special, punct = self._tokens(view)
        sp = special | punct
        freq = self._frequent(view, sp)
        local = view.valid & (view.newest() - view.positions < view.state.window[:, None, None])
        return [special, sp, sp | freq, sp | freq | local, view.valid]

    # -- profiling and decoding ------------------------------------------------------------------
    def update(self, view):
        if view.input_ids is None:
            raise ValueError("fastgen reads the tokens: call the model with input_ids")
        st, n_new = view.state, view.n_new
        new = view.new_slots()
        # the token id of each new slot, by its position among the new tokens
        offset = (view.positions - (view.newest() - n_new + 1)).clamp(0, n_new - 1)
        ids = view.input_ids.to(view.positions.device)[:, None].expand(*view.valid.shape[:2], n_new)
        tok = ids.gather(2, offset)
        rows = group_mean(view.attention_rows(n_new))  # new rows only: (B, Hkv, n_new, N)
        seen = view.visible()[:, :, 0].sum(-2).float()
        if view.prefill:
            real = view.valid[:, 0].sum(-1).float()  # each prompt's own length (padding aside)
            st.tok, st.acc, st.seen = tok, rows.sum(-2), seen
            st.length, st.window = real, torch.ceil(self.local * real)
            st.policy = self._profile(view)
            return
        st.length = st.length + n_new
        st.tok = torch.where(new, tok, st.tok)
        st.acc, st.seen = st.acc + rows.sum(-2), st.seen + seen

    def _profile(self, view) -> torch.Tensor:
        """(B, Hkv): the first policy whose kept attention, averaged over the prompt's real rows, reaches T."""
        valid = view.valid
        if self.recovery >= 1.0:
            return torch.full(valid.shape[:2], len(POLICIES) - 1, device=valid.device)
        special, sp, spf = self._masks(view)[:3]  # spf: special, punctuation and frequent
        n, length = view.n_new, view.slots
        mass = torch.zeros(*valid.shape[:2], len(POLICIES) - 1, device=valid.device)
        window = view.state.window[:, None, None, None]
        for start in range(0, n, 256):
            stop = min(start + 256, n)
            att = group_mean(view.rows(start, stop))  # (B, Hkv, r, N)
            own = view.positions[..., length - n + start:length - n + stop]  # positions of the rows
            local = valid[:, :, None] & (own[..., None] - view.positions[:, :, None] < window)
            kept = [special[:, :, None], sp[:, :, None], spf[:, :, None], spf[:, :, None] | local]
            real = valid[..., length - n + start:length - n + stop].float()  # (B, Hkv, r)
            for k, m in enumerate(kept):
                mass[..., k] += ((att * m).sum(-1) * real).sum(-1)
        mass = mass / valid.sum(-1, keepdim=True).clamp(min=1)
        ok = torch.cat([mass >= self.recovery, torch.ones_like(mass[..., :1], dtype=torch.bool)], -1)
        return ok.float().argmax(-1)  # the first policy that recovers enough

    def score(self, view):
        masks = torch.stack(self._masks(view), 0)  # (P, B, Hkv, N)
        policy = view.state.policy
        keep = masks.gather(0, policy[None, :, :, None].expand(1, *masks.shape[1:]))[0]
        return torch.zeros_like(keep, dtype=torch.float32).masked_fill(~keep, -math.inf)
