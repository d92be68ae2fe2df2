"""An encoder recipe on a vision-language model's vision tower: the image tokens shrink inside the tower.

``graphprune.optimize(vlm, "turbo", r=16)``: the encoder recipe (Turbo, ToMe, ... any that reduces an encoder's
tokens) is applied, as on any ViT, to graphprune's copy of the vision tower up to the layer whose hidden states the
model takes (:class:`TowerTrunk`, captured and rewritten once, its tokens not restored); each image's fewer tokens go
through the model's projector and take the first places of its placeholders, the other placeholders leave the prompt
(merged tokens have no positions of their own: the image's tokens close up, and later positions move down). LLaVA-1.5
(one grid of patches after a class token, ``vision_feature_select_strategy="default"``) only: the class token stays
first through the merges and is dropped after them, as the model drops it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from graphprune.kv.visual import ImagePolicy
from graphprune.recipes.base import Recipe


class TowerTrunk(torch.nn.Module):
    """The vision tower up to the hidden states the model takes (``layer``, as ``vision_feature_layer`` counts): the
    embeddings, the norm before the encoder, and the encoder layers before that point (the tower's own modules)."""

    def __init__(self, tower: torch.nn.Module, layer: int):
        super().__init__()
        inner = getattr(tower, "vision_model", tower)
        self.embeddings, self.pre_layrnorm = inner.embeddings, inner.pre_layrnorm
        layers = inner.encoder.layers
        self.layers = torch.nn.ModuleList(list(layers)[: layer % (len(layers) + 1)])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        for layer in self.layers:
            x = layer(x, None)
            x = x[0] if isinstance(x, tuple) else x
        return x


@dataclass
class OnTower(ImagePolicy):
    """The encoder recipe ``recipe`` run inside a LLaVA-1.5 vision tower (see the module docstring)."""

    name = "on-tower"
    summary = "an encoder recipe inside the vision tower"
    paper = "-"
    needs_class_token = True
    sizes_itself = "reduces image tokens by its encoder recipe's options"

    recipe: Recipe | None = None

    def __post_init__(self):
        self.name, self.summary, self.paper = self.recipe.name, self.recipe.summary, self.recipe.paper

    def validate(self) -> None:
        super().validate()
        self.recipe.validate()

    def options(self) -> dict:
        return {k: v for k, v in self.recipe.options().items() if k != "restore_tokens"}  # (never restored here)

    @property
    def reduces_images(self) -> bool:
        return True

    def renumbers(self) -> bool:
        return True  # (merged tokens have no positions of their own)

    def image_encoder(self, model):
        from graphprune.api import optimize

        config = model.config
        trunk = TowerTrunk(model.model.vision_tower, config.vision_feature_layer).eval()
        size = config.vision_config.image_size
        weight = next(trunk.parameters())  # (the example on the tower's device, in its dtype)
        pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
        options = {f.name: getattr(self.recipe, f.name) for f in dataclasses.fields(self.recipe)}
        reduced = optimize(trunk, self.recipe.name, example_inputs=(pixels,), **{**options, "restore_tokens": False})
        return ReducedImages(reduced, model.model.multi_modal_projector)


class ReducedImages:
    """Pixels (N, 3, H, W) → each image's tokens for the language model, a list of (k_i, C): the reduced trunk, the
    class token dropped, the padding slots of a recipe that keeps a count per image (ATS: size 0) left out, the
    model's projector."""

    def __init__(self, trunk, projector: torch.nn.Module):
        self.trunk, self.projector = trunk, projector
        self.report = trunk.report

    def __call__(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        out = self.trunk(pixel_values)
        tokens, sizes = out if isinstance(out, tuple) else (out, None)  # (sizes: unused otherwise, the model knows none)
        features = self.projector(tokens[:, 1:])
        if sizes is None:
            return list(features)
        return [f[real] for f, real in zip(features, sizes[:, 1:] > 0)]
