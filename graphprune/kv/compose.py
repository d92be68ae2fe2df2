"""Several decoder policies at once: prompt-row pruning (a visual recipe such as FastV, or PyramidInfer's prompt stage)
beside one cache policy that ranks slots (``recipe=["fastv", "snapkv"]``).

The rows stage stops a token where any part stops it; everything about the cache (capacity, ranking, state, storage)
is the one ranking part's. Options are routed by name to the parts that have them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from graphprune.errors import RecipeError
from graphprune.kv.policy import CachePolicy, When
from graphprune.kv.tower import OnTower
from graphprune.recipes.base import Recipe, get_recipe


def _union(stops: list[torch.Tensor | None]) -> torch.Tensor | None:
    stops = [s for s in stops if s is not None]
    return None if not stops else stops[0] if len(stops) == 1 else torch.stack(stops).any(0)


@dataclass
class Composed(CachePolicy):
    """Row-pruning parts and at most one part that evicts (see the module docstring)."""

    name = "composed"
    summary = "several decoder policies at once"
    paper = "-"

    parts: tuple = ()

    def __post_init__(self):
        evicting = [p for p in self.parts if p.evicts is not When.NEVER]
        if sum(p.reduces_images for p in self.parts) > 1 or sum(p.reduces_videos for p in self.parts) > 1:
            raise RecipeError("compose at most one recipe that reduces image (or video) tokens before the language "
                              "model")
        if len(evicting) > 1:
            raise RecipeError(f"{' and '.join(p.name for p in evicting)} both evict from the cache; compose one cache "
                              "policy with row-pruning ones (fastv, pyramiddrop, pyramidinfer, lazyllm)")
        if any(p.merges_rows for p in self.parts):
            raise RecipeError("a policy that merges rows (pact) keeps their sizes as its cache state: it does not "
                              "compose with other policies yet")
        self.cache = evicting[0] if evicting else self.parts[0]
        self.name = "+".join(p.name for p in self.parts)
        # what the cache and the rows stage are built from
        self.evicts, self.State, self.slot_order = self.cache.evicts, self.cache.State, self.cache.slot_order
        self.exportable = all(p.exportable for p in self.parts)
        self.revives = any(p.revives for p in self.parts)
        self.needs_images = any(p.needs_images for p in self.parts)
        self.needs_class_token = any(p.needs_class_token for p in self.parts)

    def validate(self) -> None:
        for p in self.parts:
            p.validate()

    def fit(self, n_layers):
        for p in self.parts:
            p.fit(n_layers)

    def options(self) -> dict:
        return {p.name: p.options() for p in self.parts}

    @property
    def prunes_rows(self) -> bool:
        return any(p.prunes_rows for p in self.parts)

    # -- the cache: the ranking part's --------------------------------------------------------
    def tokens(self, prompt_len):
        return self.cache.tokens(prompt_len)

    def capacity(self, layer, n_layers, prompt_len):
        return self.cache.capacity(layer, n_layers, prompt_len)

    def sink_tokens(self):
        return self.cache.sink_tokens()

    def recent_tokens(self, capacity):
        return self.cache.recent_tokens(capacity)

    def update(self, view):
        self.cache.update(view)

    def score(self, view):
        return self.cache.score(view)

    def codec(self):
        return self.cache.codec()

    def attention_keys(self, view):
        return self.cache.attention_keys(view)

    def attention_slots(self, view):
        return self.cache.attention_slots(view)

    def new_state(self):
        return self.cache.new_state()

    # -- before the language model: the one part that reduces images ---------------------------
    def _image_part(self) -> CachePolicy | None:
        return next((p for p in self.parts if p.reduces_images), None)

    def image_tokens(self, image):
        part = self._image_part()
        return None if part is None else part.image_tokens(image)

    def fixed_image_tokens(self, features):
        part = self._image_part()
        return None if part is None else part.fixed_image_tokens(features)

    def merge_image(self, image):
        part = self._image_part()
        return None if part is None else part.merge_image(image)

    def image_encoder(self, model):
        part = self._image_part()
        return None if part is None else part.image_encoder(model)

    def video_tokens(self, video):
        reducers = [p for p in self.parts if p.reduces_videos]
        return reducers[0].video_tokens(video) if reducers else None

    @property
    def reduces_videos(self) -> bool:
        return any(p.reduces_videos for p in self.parts)

    def renumbers(self):
        return any(p.renumbers() for p in self.parts if p.reduces_images)

    @property
    def reduces_images(self) -> bool:
        return any(p.reduces_images for p in self.parts)

    # -- the rows stage: every part's --------------------------------------------------------
    def rows(self, view):
        return _union([p.rows(view) for p in self.parts])

    def rows_before(self, view):
        return _union([p.rows_before(view) for p in self.parts])

    def image_rows_after(self, n, layer, n_layers):
        pruning = [p for p in self.parts if p.prunes_rows]
        return n if not pruning else pruning[0].image_rows_after(n, layer, n_layers) if len(pruning) == 1 else None


def compose(recipes: list, options: dict) -> Composed:
    """The policies ``recipes`` (names or recipe objects) as one; each of ``options`` goes to the named recipes that
    have it (where several do, to the ones not sized by their own options, e.g. ``budget`` to the cache policy)."""
    if len(recipes) < 2:
        raise RecipeError("give two or more recipes to compose, or one recipe name")
    classes = []
    for r in recipes:
        if isinstance(r, Recipe):
            classes.append(type(r))
        else:
            classes.append(type(get_recipe(r)))  # (an unknown name fails here, with suggestions)
    if sum(getattr(cls, "kind", None) != "cache" for cls in classes) > 1:
        raise RecipeError("compose at most one encoder recipe (it runs inside a vision-language model's vision tower) "
                          "with decoder policies (e.g. recipe=['turbo', 'snapkv'])")
    routed: dict[int, dict] = {i: {} for i, r in enumerate(recipes) if not isinstance(r, Recipe)}
    for key, value in options.items():
        have = [i for i in routed if key in {f.name for f in dataclasses.fields(classes[i])}]
        if len(have) > 1:
            have = [i for i in have if classes[i].sizes_itself is None]
        if len(have) != 1:
            names = ", ".join(c.name for c in classes)
            raise RecipeError(f"option {key} belongs to {'none' if not have else 'more than one'} of {names}; "
                              "pass recipe objects instead (graphprune.recipes.get_recipe(name, **options))")
        routed[have[0]][key] = value
    parts = tuple(r if isinstance(r, Recipe) else get_recipe(r, **routed[i]) for i, r in enumerate(recipes))
    return Composed(parts=tuple(p if p.kind == "cache" else OnTower(recipe=p) for p in parts))
