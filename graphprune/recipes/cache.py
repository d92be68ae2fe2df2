"""What a cache recipe is: how much each layer of a decoder LLM keeps, and which slots.

A cache recipe acts on the KV cache of a decoder (see :mod:`graphprune.kv.cache`). After each
attention call the layer asks the recipe to ``observe`` the new queries (update running
scores), and when the layer holds more than its capacity, to ``select`` the slots to keep.
Scores come from q and k for the query rows the method needs (``layer.attention_rows``,
``layer.attention_column_sums``), never from a materialised attention matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Union

import torch

from graphprune.errors import RecipeError, ScheduleError
from graphprune.recipes.base import Recipe, option


@dataclass
class CacheRecipe(Recipe):
    kind: ClassVar[str] = "cache"
    zero: ClassVar[dict] = {"budget": 1.0}
    evicts_while_decoding: ClassVar[bool] = True  # False: compress the prompt once, then let the cache grow
    state: ClassVar[tuple[str, ...]] = ()  # names of the per-slot score tensors the recipe keeps (layer.state)
    ring: ClassVar[bool] = False  # evicts one slot per decoded token, reading slot order from positions (no copies)
    exportable: ClassVar[bool] = True  # a fixed budget gives static cache shapes (ONNX decode step)
    prunes_prompt: ClassVar[bool] = False  # later layers see fewer prompt tokens (kv/prune.py)
    sizes_itself: ClassVar[str | None] = None  # how a recipe with no budget sizes its cache (then budget stays 1.0)

    budget: Union[int, float] = option(
        0.5, "cached tokens per layer: an int, or a fraction in (0, 1) of the prompt length (1.0: keep everything)")

    def validate(self) -> None:
        b = self.budget
        if self.sizes_itself is not None and b != 1.0:
            raise ScheduleError(f"{self.name} {self.sizes_itself}: leave budget at 1.0")
        if isinstance(b, bool) or not isinstance(b, (int, float)):
            raise ScheduleError(f"budget must be an int (tokens) or a float in (0, 1) (fraction of the prompt; 1.0: full cache), got {b!r}")
        if isinstance(b, int) and b < self.min_budget():
            raise ScheduleError(f"budget={b} is too small for {self.name}: it needs at least {self.min_budget()} tokens "
                                f"({self.min_budget_reason()})")
        if isinstance(b, float) and not 0 < b <= 1:
            raise ScheduleError(f"a fractional budget must lie in (0, 1) (1.0: the full cache), got {b}; give an int for a token count")

    def cache_layer(self):
        """A cache-layer class of the recipe's own (KIVI's quantised storage); None: the evicting layer."""
        return None

    def options(self) -> dict:
        return {k: v for k, v in super().options().items() if k != "restore_tokens"}

    @classmethod
    def describe_options(cls) -> list[tuple[str, str, str]]:
        return [o for o in super().describe_options() if o[0] != "restore_tokens"]

    def install(self, model) -> None:
        """Hooks on graphprune's copy of the model that the recipe needs (prompt pruning carries the kept rows)."""
        if self.prunes_prompt:
            from graphprune.kv.prune import install

            install(model)

    def min_budget(self) -> int:
        return 1

    def min_budget_reason(self) -> str:
        return "one cached token"

    def apply(self, graph):  # cache recipes act on decoders through graphprune.kv, not on encoder graphs
        raise RecipeError(f"'{self.name}' is a KV-cache recipe for decoder LLMs (Llama, Qwen2/3, Mistral); "
                          "this model is not one")

    def tokens(self, prompt_len: int) -> int:
        """The uniform per-layer budget for a prompt of ``prompt_len`` tokens (padding included)."""
        if self.budget == 1.0 and isinstance(self.budget, float):
            return 2**62  # the full cache
        if isinstance(self.budget, float):
            return max(self.min_budget(), int(self.budget * prompt_len))
        return self.budget

    def layer_capacity(self, layer: int, n_layers: int, prompt_len: int) -> int:
        """How many slots layer ``layer`` keeps; uniform unless the recipe says otherwise."""
        return self.tokens(prompt_len)

    def attention_inputs(self, layer, query: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The query and keys attention uses after the prompt (StreamingLLM re-rotates them)."""
        return query, keys

    def observe(self, layer, query: torch.Tensor, scaling: float, prompt: bool) -> None:
        """Update running per-slot scores with the new queries (after the slots were appended)."""

    def select(self, layer, query: torch.Tensor, scaling: float, capacity: int) -> torch.Tensor:
        """Sorted slot indices to keep, (B, Hkv, capacity)."""
        raise NotImplementedError


def group_mean(rows: torch.Tensor) -> torch.Tensor:
    """Scores of the query heads that share a KV head, averaged: (B, Hkv, G, ...) → (B, Hkv, ...)."""
    return rows.mean(dim=2)
