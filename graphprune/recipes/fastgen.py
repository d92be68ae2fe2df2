"""FastGen: Model Tells You What to Discard: Adaptive KV Cache Compression for LLMs (Ge et al., ICLR 2024)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from graphprune.errors import ScheduleError
from graphprune.recipes.base import option, register
from graphprune.recipes.cache import CacheRecipe, group_mean

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


@register
@dataclass
class FastGen(CacheRecipe):
    name = "fastgen"
    summary = "profile each head on the prompt, give it the cheapest policy keeping ≥ T of its attention"
    paper = "Model Tells You What to Discard: Adaptive KV Cache Compression for LLMs (ICLR 2024)"
    zero = {"recovery": 1.0}
    state = ("tok", "acc", "seen")
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

    def layer_capacity(self, layer, n_layers, prompt_len):
        return 0  # every step decides

    # -- the parts of a policy ------------------------------------------------------------------
    def _tokens(self, layer, ids):
        special = torch.isin(ids, torch.tensor(self.special_ids, dtype=ids.dtype, device=ids.device))
        punct = torch.isin(ids, torch.tensor(self.punct_ids, dtype=ids.dtype, device=ids.device))
        return special & layer.valid, punct & layer.valid

    def _frequent(self, layer, protected):
        """(B, Hkv, N): the top ⌈r_f · length⌉ tokens by mean received attention, besides ``protected``."""
        score = (layer.state["acc"] / layer.state["seen"].clamp(min=1)).masked_fill(protected | ~layer.valid, -math.inf)
        count = torch.ceil(self.frequent * layer.aux["length"])[:, None, None]  # r_f × the tokens seen so far
        rank = score.argsort(-1, descending=True).argsort(-1)
        return (rank < count) & layer.valid & ~protected

    def _masks(self, layer) -> list[torch.Tensor]:
        """Keep-masks of the five policies (cumulative), (B, Hkv, N) each; local is per current token."""
        special, punct = self._tokens(layer, layer.state["tok"])
        sp = special | punct
        freq = self._frequent(layer, sp)
        now = layer.pos.masked_fill(~layer.valid, -1).amax(-1, keepdim=True)
        local = layer.valid & (now - layer.pos < layer.aux["window"][:, None, None])
        return [special, sp, sp | freq, sp | freq | local, layer.valid]

    # -- profiling and decoding ------------------------------------------------------------------
    def observe(self, layer, query, scaling, prompt):
        n_new = query.shape[2]
        ids = layer.inputs.get("input_ids")
        if ids is None:
            raise ValueError("fastgen reads the tokens: call the model with input_ids")
        b, hkv = layer.valid.shape[:2]
        tok = ids[:, -n_new:].to(layer.pos.device)[:, None].expand(b, hkv, n_new)
        rows = group_mean(layer.attention_rows(query, scaling, n_new))  # new rows only: (B, Hkv, n_new, N)
        if prompt:
            layer.state = {"tok": tok, "acc": rows.sum(-2), "seen": layer.visible(n_new, 0, n_new)[:, :, 0].sum(-2).float()}
            real = layer.valid[:, 0].sum(-1).float()  # each prompt's own length (padding aside)
            layer.aux["length"] = real
            layer.aux["window"] = torch.ceil(self.local * real)
            layer.aux["policy"] = self._profile(layer, query, scaling)
            return
        layer.aux["length"] = layer.aux["length"] + n_new
        fresh = layer.fresh(layer.state["tok"])
        fresh[..., -n_new:] = tok
        seen = layer.visible(n_new, 0, n_new)[:, :, 0].sum(-2).float()
        layer.state = {"tok": fresh, "acc": layer.fresh(layer.state["acc"]) + rows.sum(-2),
                       "seen": layer.fresh(layer.state["seen"]) + seen}

    def _profile(self, layer, query, scaling) -> torch.Tensor:
        """(B, Hkv): the first policy whose kept attention, averaged over the prompt's real rows, reaches T."""
        if self.recovery >= 1.0:
            return torch.full(layer.valid.shape[:2], len(POLICIES) - 1, device=layer.valid.device)
        special, sp = self._masks(layer)[:2]
        freq = self._frequent(layer, sp)
        n = query.shape[2]
        mass = torch.zeros(*layer.valid.shape[:2], len(POLICIES) - 1, device=layer.valid.device)
        window = layer.aux["window"][:, None, None, None]
        for start in range(0, n, 256):
            stop = min(start + 256, n)
            att = group_mean(layer._rows(query, scaling, start, stop))  # (B, Hkv, r, N)
            own = layer.pos[..., layer.length - n + start:layer.length - n + stop]  # positions of the rows
            local = layer.valid[:, :, None] & (own[..., None] - layer.pos[:, :, None] < window)
            kept = [special[:, :, None], sp[:, :, None], (sp | freq)[:, :, None], (sp | freq)[:, :, None] | local]
            real = layer.valid[..., layer.length - n + start:layer.length - n + stop].float()  # (B, Hkv, r)
            for k, m in enumerate(kept):
                mass[..., k] += ((att * m).sum(-1) * real).sum(-1)
        mass = mass / layer.valid.sum(-1, keepdim=True).clamp(min=1)
        ok = torch.cat([mass >= self.recovery, torch.ones_like(mass[..., :1], dtype=torch.bool)], -1)
        return ok.float().argmax(-1)  # the first policy that recovers enough

    def select(self, layer, query, scaling, capacity):
        masks = torch.stack(self._masks(layer), 0)  # (P, B, Hkv, N)
        policy = layer.aux["policy"]
        keep = masks.gather(0, policy[None, :, :, None].expand(1, *masks.shape[1:]))[0]
        layer.valid = layer.valid & keep
        size = max(int(keep.sum(-1).max()), 1)
        return layer.top(keep.float(), size)
