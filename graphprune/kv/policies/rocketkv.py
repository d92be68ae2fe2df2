"""RocketKV: Accelerating Long-Context LLM Inference via Two-Stage KV Cache Compression (Behnam et al., 2025).

Stage 1 evicts the prompt once: SnapKV's observation window votes for the earlier keys, the votes of a KV head's
query heads are summed and max-pooled (kernel 63), and each KV head keeps its best. Stage 2 leaves the cache whole and,
at every decoding step, attends exactly to the top-k slots of an approximate score (hybrid sparse attention): the
channels where the query is largest, against page-wise bounds of the keys (per channel the page's largest key where
the query's sign is positive, its smallest where negative), softmax at SparQ's temperature, mean over the query heads.

The budget B is split between the stages as in the authors' code (NVlabs/RocketKV at 63637c8,
``infllm_utils.compress``): with G the new tokens planned for and L the prompt plus G, c = L / B,
α = min(0.2 + 0.06 log2 c, 0.8); the cache holds C = L / c^α tokens (at least min(2G, L)), of which C − G from the
prompt; stage 2 reads k = B / 2 tokens, with pages of p = ⌈√(C / B)⌉ slots (1 where that exceeds C / B) and
r = ⌊d p B / C⌋ channels. Each sequence of a batch is planned from its own prompt length.

Differences from the authors' loop, by design: their driver prefills the prompt less its last token and sends that
token through stage 2; here the whole prompt is one forward (its attention exact, stage 1's window its last tokens).
Tied scores (the slots of one page) are taken in slot order where the authors' ``topk`` takes any of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from graphprune.kv.policies.snapkv import SnapKV
from graphprune.kv.policy import FULL
from graphprune.recipes.base import option, register


@dataclass
class Prompt:
    tokens: object = None  # (B,): real prompt tokens of each sequence


@dataclass(frozen=True)
class Plan:
    """One sequence's split of the budget: prompt tokens kept by stage 1; stage 2's tokens, page size and channels."""

    keep: int
    k: int
    page: int
    channels: int


def plan(budget: int, prompt: int, new_tokens: int, head_dim: int) -> Plan:
    """The authors' split of the token budget ``budget`` for a prompt of ``prompt`` tokens and ``new_tokens`` to come."""
    total = prompt + new_tokens
    c = max(1.0, total / budget)
    alpha = min(0.2 + 0.06 * math.log2(c), 0.8)
    capacity = max(int(total / c**alpha), min(2 * new_tokens, total))
    c2 = max(1.0, capacity / budget)
    page = math.ceil(math.sqrt(c2))
    page = 1 if page > c2 else page
    return Plan(capacity - new_tokens, budget // 2, page, min(max(int(head_dim * page / c2), 1), head_dim))


def hybrid_slots(q: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, p: Plan) -> torch.Tensor:
    """Stage 2 for one sequence: the top ``p.k`` slots (Hkv, N) bool of the approximate attention of the newest
    queries ``q`` (Hkv, G, D) over ``keys`` (Hkv, N, D); pages of ``p.page`` consecutive real slots."""
    hkv, n, d = keys.shape
    sign = torch.where(q.sum(1) > 0, 1.0, -1.0)  # (Hkv, D): the group's sign per channel
    page = (valid.cumsum(-1) - 1).div(p.page, rounding_mode="floor")
    pages = int(page.amax()) + 1
    page = page.masked_fill(~valid, pages)  # padding goes to a page of its own, left out
    signed = sign[:, None, :] * keys
    bound = signed.new_full((hkv, pages + 1, d), -math.inf)
    bound = bound.scatter_reduce(1, page[..., None].expand_as(signed), signed, "amax")[:, :pages] * sign[:, None, :]
    channels = q.abs().mean(1).topk(p.channels, -1).indices  # (Hkv, r): shared by the group
    q_sel = q.gather(-1, channels[:, None, :].expand(-1, q.shape[1], -1))  # (Hkv, G, r)
    approx = torch.einsum("hgr,hpr->hgp", q_sel, bound.gather(-1, channels[:, None, :].expand(-1, pages, -1)))
    per_slot = approx.gather(-1, page.clamp(max=pages - 1)[:, None, :].expand(-1, q.shape[1], -1))  # (Hkv, G, N)
    tau = (d * q_sel.abs().sum(-1) / q.abs().sum(-1).clamp_min(1e-30)).sqrt()  # (Hkv, G)
    probs = (per_slot / tau[..., None]).masked_fill(~valid[:, None], -math.inf).softmax(-1).mean(1)  # (Hkv, N)
    best = probs.sort(dim=-1, descending=True, stable=True).indices[..., :min(p.k, n)]
    return torch.zeros_like(valid).scatter(-1, best, True) & valid


@register
@dataclass
class RocketKV(SnapKV):
    name = "rocketkv"
    summary = "evict the prompt once (SnapKV votes, max pooled per KV head), then attend at each step to the top " \
              "half-budget slots of a cheap approximate score (hybrid sparse attention)"
    paper = "RocketKV: Accelerating Long-Context LLM Inference via Two-Stage KV Cache Compression (2025)"
    State = Prompt
    exportable = False  # stage 2's page bounds and stage 1's per-sequence sizes are data-dependent

    budget: int | float = option(0.25, "token budget B: an int, or a fraction of the prompt (1.0: the full cache); "
                                       "a decoding step reads as much as attention over B tokens")
    window: int = option(32, "observation window: the last prompt queries that score the earlier keys; always kept")
    kernel: int = option(63, "1-D max-pooling kernel that smooths the votes")
    pooling: str = option("max", "pooling of the votes: max (RocketKV) or avg")
    new_tokens: int = option(128, "decoding steps the budget is planned for (the authors' max_new_tokens)")

    def min_budget(self) -> int:
        return 2

    def min_budget_reason(self) -> str:
        return "stage 2 attends to half the budget: at least one token"

    def capacity(self, layer, n_layers, prompt_len):
        return FULL if self.tokens(prompt_len) == FULL else None  # each sequence's plan decides

    def recent_tokens(self, capacity):
        return 0  # (the window is kept by score)

    def _plan(self, prompt: int, head_dim: int) -> Plan:
        return plan(self.tokens(prompt), prompt, self.new_tokens, head_dim)

    def update(self, view):
        if view.prefill:
            view.state.tokens = view.valid[:, 0].sum(-1)

    def score(self, view):
        """Stage 1: per sequence, the window and the best ``keep − window`` earlier slots by SnapKV's pooled votes;
        -inf for the others."""
        w = min(self.window, view.n_new)
        votes = view.attention_rows(w).sum((-2, 2))[..., :-w]  # (B, Hkv, N − w): summed over the window and group
        b, h, n = votes.shape
        pool = F.avg_pool1d if self.pooling == "avg" else F.max_pool1d
        votes = pool(votes.reshape(b * h, 1, n), self.kernel, stride=1, padding=self.kernel // 2).reshape(b, h, n)
        votes = votes.masked_fill(~view.valid[..., :-w], -math.inf)
        order = votes.sort(dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=order.device).expand_as(order))
        head_dim = view.keys.shape[-1]
        chosen = torch.tensor([self._plan(int(t), head_dim).keep - w for t in view.state.tokens], device=rank.device)
        votes = votes.masked_fill(rank >= chosen[:, None, None], -math.inf)
        return torch.cat([votes, votes.new_full((b, h, w), math.inf)], -1)

    def attention_slots(self, view):
        """Stage 2 (decoding steps): each sequence's top-k slots by the hybrid approximate score."""
        if view.capacity == FULL:
            return None
        b, hkv, n, d = view.keys.shape
        q = view.queries[:, :, -1].reshape(b, hkv, -1, d).float()
        keys, valid = view.keys.float(), view.valid
        chosen = []
        for i, tokens in enumerate(view.state.tokens.tolist()):
            p = self._plan(tokens, d)
            everything = p.k >= int(valid[i].sum(-1).amax())
            chosen.append(valid[i] if everything else hybrid_slots(q[i], keys[i], valid[i], p))
        return torch.stack(chosen)
