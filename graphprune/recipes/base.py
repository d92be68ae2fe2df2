"""What a recipe is, and the registry of recipes.

A recipe is a small dataclass: its fields are the user's options (with defaults and help
text), ``check`` validates them against the analysed model, and ``apply`` rewrites the
graph with passes and token ops, returning the number of tokens entering each block.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from typing import ClassVar

from graphprune.errors import RecipeError
from graphprune.patterns import ModelGraph

RECIPES: dict[str, type["Recipe"]] = {}


def option(default, help: str):  # noqa: A002
    """A recipe option with its help text; a mutable default (list, dict) is copied for each instance."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class Recipe:
    name: ClassVar[str]
    kind: ClassVar[str] = "tokens"  # "tokens": reduces an encoder's tokens; "cache": acts on a decoder's KV cache
    summary: ClassVar[str]
    paper: ClassVar[str]
    zero: ClassVar[dict]  # options under which the recipe reduces nothing (the model is reproduced exactly)

    restore_tokens: bool = option(
        True, "per-token outputs keep the original token count (each reduced token copied back to the positions it "
        "came from); False returns the reduced tokens and their sizes: (output, sizes)"
    )

    def validate(self) -> None:
        """Raise ScheduleError for options of the wrong form; runs before any capture work."""

    def check(self, graph: ModelGraph) -> None:
        """Raise RecipeError / ScheduleError if the options cannot apply to this model."""

    def apply(self, graph: ModelGraph) -> list[int]:
        raise NotImplementedError

    def any_length(self) -> bool:
        """Whether the rewritten graph works out every token count from the tokens it is given (none fixed when the
        model is optimized): a text model then captures one graph with a symbolic sequence length for
        ``lengths=[...]``, exact at every length up to the longest captured (it is captured there), instead of one
        graph per bucket."""
        return False

    def options(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def describe_options(cls) -> list[tuple[str, str, str]]:
        return [(f.name, repr(f.default if f.default is not dataclasses.MISSING else f.default_factory()), f.metadata.get("help", ""))
                for f in dataclasses.fields(cls)]


def register(cls: type[Recipe]) -> type[Recipe]:
    RECIPES[cls.name] = cls
    return cls


def get_recipe(name: str, **options) -> Recipe:
    if name not in RECIPES:
        close = difflib.get_close_matches(name, RECIPES, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise RecipeError(f"unknown recipe '{name}'.{hint} Available: {', '.join(sorted(RECIPES))}")
    cls = RECIPES[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise RecipeError(f"recipe '{name}' has no option {', '.join(unknown)}; its options are: {', '.join(sorted(known))}")
    recipe = cls(**options)
    recipe.validate()
    return recipe
