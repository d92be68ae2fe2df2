"""Recipes: one file per published method, collected in a registry."""

from graphprune.recipes import atc, ats, diffrate, evit, evo_vit, pitome, ppt, tome, tps, zero_tprune  # noqa: F401  (registers the recipes)
from graphprune.recipes.base import RECIPES, Recipe, get_recipe, register

__all__ = ["RECIPES", "Recipe", "get_recipe", "register", "list_recipes"]


def list_recipes() -> list[str]:
    return sorted(RECIPES)
