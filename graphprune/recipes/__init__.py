"""Encoder recipes: one file per published method, collected in the registry that KV-cache policies share
(graphprune.kv.policies registers those)."""

from __future__ import annotations

from graphprune.recipes import (  # noqa: F401  (registers the recipes)
    atc, ats, diffrate, evit, evo_vit, pitome, ppt, tome, tps, turbo, zero_tprune,
)
from graphprune.recipes.base import RECIPES, Recipe, get_recipe, register

__all__ = ["RECIPES", "Recipe", "get_recipe", "register", "list_recipes"]


def list_recipes(kind: str | None = None) -> list[str]:
    """Recipe names; ``kind="tokens"``: those that reduce an encoder's tokens, ``kind="cache"``: KV-cache recipes,
    ``kind="prompt"``: prompt compressors, ``kind="denoiser"``: diffusion denoisers' (``tomesd``)."""
    return sorted(n for n, c in RECIPES.items() if kind is None or getattr(c, "kind", "tokens") == kind)
