"""TOVA: Transformers are Multi-State RNNs (Oren et al., 2024): token omission via attention."""

from __future__ import annotations

from dataclasses import dataclass

from graphprune.recipes.base import register
from graphprune.recipes.cache import CacheRecipe


@register
@dataclass
class TOVA(CacheRecipe):
    name = "tova"
    summary = "at every step drop the tokens the current query attends to least (averaged over the layer's heads)"
    paper = "Transformers are Multi-State RNNs (TOVA, 2024)"
    ring = True

    def select(self, layer, query, scaling, capacity):
        score = layer.attention_rows(query, scaling, 1)[..., -1, :].mean(dim=(1, 2))[:, None]  # (B, 1, N)
        return layer.top(score.expand_as(layer.valid), capacity)
