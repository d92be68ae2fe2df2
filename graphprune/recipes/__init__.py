"""Recipes: one file per published method, collected in a registry."""

from __future__ import annotations

from graphprune.recipes import (  # noqa: F401  (registers the recipes)
    atc, ats, diffrate, evit, evo_vit, fastgen, h2o, kivi, lazyllm, pitome, ppt, pyramidinfer, pyramidkv, scissorhands, snapkv,
    streaming_llm, tome, tova, tps, zero_tprune,
)
from graphprune.recipes.base import RECIPES, Recipe, get_recipe, register

__all__ = ["RECIPES", "Recipe", "get_recipe", "register", "list_recipes"]


def list_recipes(kind: str | None = None) -> list[str]:
    """Recipe names; ``kind="tokens"``: those that reduce an encoder's tokens, ``kind="cache"``: KV-cache recipes."""
    return sorted(n for n, c in RECIPES.items() if kind is None or getattr(c, "kind", "tokens") == kind)
