"""Recipes: one file per published method, collected in a registry."""

from graphprune.recipes import (  # noqa: F401  (registers the recipes)
    atc, ats, diffrate, evit, evo_vit, h2o, kivi, pitome, ppt, pyramidkv, scissorhands, snapkv, streaming_llm, tome, tova, tps,
    zero_tprune,
)
from graphprune.recipes.base import RECIPES, Recipe, get_recipe, register

__all__ = ["RECIPES", "Recipe", "get_recipe", "register", "list_recipes"]


def list_recipes() -> list[str]:
    return sorted(RECIPES)
