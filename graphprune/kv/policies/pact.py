"""PACT: Pruning and Clustering-Based Token Reduction for Faster Visual Language Models (Dhouib et al., CVPR 2025).

As in the authors' code (orailix/PACT at cf9a0c9, ``PACT/utils.py`` and their Qwen2 model file), once, in the prompt
pass, before decoder layer L:

- **EUTI** scores the visual tokens with layer L's own projections of its input norm of the hidden states, before the
  rotary embedding: the query averaged over every token up to the last visual one (the system prompt and the
  images) attends, per head, over those tokens (softmax), the head mean is restricted to the visual tokens and
  multiplied by each token's hidden-state norm; the top int(n·keep) visual tokens are kept for clustering, the others
  are pruned.
- **DBDPC** clusters the kept tokens by their layer-L keys after the rotary embedding (all KV heads side by side),
  distance 1 − cosine (≥ 0): density ρ_i = Σ_j exp(−(d_ij/2)²), replaced by its rank; in rounds, every unassigned
  token farther than d_c (``cutoff``) from each unassigned token of higher density becomes a centre, and the unassigned
  tokens within d_c of a new centre are assigned; once a round makes fewer than 10 centres, the rest (by density,
  highest first) become centres where they lie farther than d_c from every centre. Each kept token joins its nearest
  centre; a pruned token joins its nearest centre when within α·d_c (``retrieve``), else it is dropped.
- Each centre's row takes the plain mean of its members' hidden states, at the centre's own position; every other
  visual row stops before layer L. **Proportional attention**: from layer L on, in the prompt and while decoding,
  each merged token's key adds the log of its cluster's size to every attention logit.

Published settings: layer 4; LLaVA-OneVision keep 0.55, d_c 0.21; Qwen2-VL keep 0.8, d_c 0.1; α 1.5 (the defaults
here are LLaVA-OneVision's). Every sequence of a batch is reduced on its own (their code runs at batch 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from graphprune.errors import ScheduleError
from graphprune.kv.policy import MergedRows, slot_field
from graphprune.kv.visual import ImagePolicy
from graphprune.recipes.base import option, register

ROUND = 10  # a DBDPC round that makes fewer centres ends the rounds (the authors' constant)


@dataclass
class Sizes:
    log_size: torch.Tensor | None = slot_field("log of how many tokens each cached slot stands for")


def euti(q: torch.Tensor, k: torch.Tensor, hidden: torch.Tensor, scope: torch.Tensor) -> torch.Tensor:
    """EUTI importance (R,) of one sequence's rows: ``q`` (Hq, R, D), ``k`` (Hkv, R, D) before the rotary embedding,
    ``hidden`` (R, C) the layer's input, ``scope`` (R,) bool the tokens the mean query and the softmax run over."""
    k = k.repeat_interleave(q.shape[0] // k.shape[0], 0)
    mean = q[:, scope].float().mean(1)  # (Hq, D)
    logits = torch.einsum("hd,hrd->hr", mean, k.float()) / math.sqrt(q.shape[-1])
    att = logits.masked_fill(~scope, -torch.inf).softmax(-1).mean(0)
    return att * hidden.float().norm(dim=-1)


def dbdpc(features: torch.Tensor, cutoff: float) -> tuple[list[int], torch.Tensor]:
    """DBDPC of tokens ``features`` (n, F): the centres (indices, in the order they were made) and the distances
    (n, n), 1 − cosine clamped at 0."""
    x = torch.nn.functional.normalize(features.float(), dim=-1)
    dist = (1 - x @ x.T).clamp(min=0)
    n = dist.shape[0]
    rank = torch.exp(-(dist / 2) ** 2).sum(-1).argsort().argsort()  # density, replaced by its rank
    unassigned = torch.ones(n, dtype=torch.bool, device=x.device)
    centres: list[int] = []
    while bool(unassigned.any()):
        higher = unassigned[None, :] & (rank[None, :] > rank[:, None])  # (i, j): j unassigned, denser than i
        delta = dist.masked_fill(~higher, torch.inf).min(-1).values
        new = (unassigned & (delta > cutoff)).nonzero().flatten().tolist()
        centres += new
        if new:
            unassigned &= ~(dist[new] <= cutoff).any(0)
        unassigned[new] = False
        if len(new) < ROUND:
            for i in sorted(unassigned.nonzero().flatten().tolist(), key=lambda i: -int(rank[i])):
                if not centres or bool(dist[i, centres].min() > cutoff):
                    centres.append(i)
            break
    return centres, dist


@register
@dataclass
class PACT(ImagePolicy):
    name = "pact"
    summary = "before one layer, prune the image tokens least important to the prompt's mean query (EUTI) and " \
              "merge the rest by density-peak clustering of their keys (DBDPC), with proportional attention"
    paper = "PACT: Pruning and Clustering-Based Token Reduction for Faster Visual Language Models (CVPR 2025)"
    zero = {"keep": 1.0, "cutoff": 0.0, "retrieve": 0.0}
    sizes_itself = "keeps and merges image tokens by its own options (set keep, cutoff)"
    State = Sizes

    layer: int = option(4, "L: the layer before which image tokens are pruned and merged")
    keep: float = option(0.55, "share of the image tokens EUTI keeps for clustering, int(n·keep) (LLaVA-OneVision "
                               "0.55, Qwen2-VL 0.8)")
    cutoff: float = option(0.21, "d_c: DBDPC's cutoff distance, 1 − cosine of keys (LLaVA-OneVision 0.21, Qwen2-VL "
                                 "0.1)")
    retrieve: float = option(1.5, "α: a pruned token joins its nearest centre within α·d_c")

    def validate(self) -> None:
        super().validate()
        if not 0 < self.keep <= 1:
            raise ScheduleError(f"keep must lie in (0, 1], got {self.keep}")
        if self.cutoff < 0 or self.retrieve < 0:
            raise ScheduleError(f"cutoff and retrieve must be ≥ 0, got {self.cutoff} and {self.retrieve}")
        if not isinstance(self.layer, int) or self.layer < 1:
            raise ScheduleError(f"layer must be a layer index ≥ 1, got {self.layer}")

    def fit(self, n_layers):
        if self.layer >= n_layers:
            raise ScheduleError(f"layer must lie below the model's {n_layers} layers, got {self.layer}")

    def merge_rows(self, rows):
        if rows.layer != self.layer or rows.visual is None or not bool(rows.visual.any()) or \
                (self.keep == 1 and self.cutoff == 0 and self.retrieve == 0):
            return None
        q, k = rows.queries_keys()
        keys = rows.rotate(k).transpose(1, 2).flatten(2)  # (B, R, Hkv·D): after the rotary embedding
        hidden, keep = rows.hidden.clone(), rows.real.clone()
        log_size = torch.zeros(rows.real.shape, device=hidden.device)
        for b in range(hidden.shape[0]):
            visual = (rows.visual[b] & rows.real[b]).nonzero().flatten()
            if len(visual) == 0:
                continue
            scope = rows.real[b] & (torch.arange(rows.real.shape[1], device=visual.device) <= visual[-1])
            score = euti(q[b], k[b], rows.hidden[b], scope)[visual]
            kept = visual[score.topk(int(len(visual) * self.keep)).indices]
            kept = kept.sort().values
            pruned = visual[~torch.isin(visual, kept)]
            centres, dist = dbdpc(keys[b, kept], self.cutoff)
            home = dist[:, centres].argmin(-1)  # each kept token's nearest centre
            members = [kept[home == c] for c in range(len(centres))]
            if len(pruned):
                x = torch.nn.functional.normalize(keys[b].float(), dim=-1)
                d = (1 - x[pruned] @ x[kept[centres]].T).clamp(min=0)
                near, where = d.min(-1)
                for c in range(len(centres)):
                    members[c] = torch.cat([members[c], pruned[(where == c) & (near <= self.retrieve * self.cutoff)]])
            keep[b, visual] = False
            for c, m in zip(centres, members):
                row = kept[c]
                keep[b, row] = True
                hidden[b, row] = rows.hidden[b, m].float().mean(0).to(hidden.dtype)
                log_size[b, row] = math.log(len(m))
        return MergedRows(hidden, keep, log_size)

    def attention_bias(self, view):
        if view.layer < self.layer:
            return None
        st, sizes = view.state, view.query_log_size
        if view.prefill and sizes is not None and bool(sizes.any()):  # the merged rows' slots, as they are written
            if st.log_size is None:
                st.log_size = torch.zeros(view.valid.shape, device=sizes.device)
            st.log_size[:, :, view.slots - view.n_new:] = sizes[:, None].float()
        return st.log_size
