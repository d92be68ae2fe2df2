"""TOVA: Transformers are Multi-State RNNs (Oren et al., 2024): token omission via attention."""

from __future__ import annotations

from dataclasses import dataclass

from graphprune.kv.policy import CachePolicy
from graphprune.recipes.base import register


@register
@dataclass
class TOVA(CachePolicy):
    name = "tova"
    summary = "at every step drop the tokens the current query attends to least (averaged over the layer's heads)"
    paper = "Transformers are Multi-State RNNs (TOVA, 2024)"

    def score(self, view):
        return view.attention_rows(1)[..., -1, :].mean(dim=(1, 2))[:, None].expand_as(view.valid)  # (B, 1, N)
