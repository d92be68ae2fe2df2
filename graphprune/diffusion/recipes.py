"""``tomesd``: Token Merging for Stable Diffusion (Bolya & Hoffman, CVPR Workshops 2023), on diffusers denoisers."""

from __future__ import annotations

from dataclasses import dataclass

from graphprune.errors import RecipeError, ScheduleError
from graphprune.recipes.base import Recipe, option, register


@register
@dataclass
class ToMeSD(Recipe):
    name = "tomesd"
    kind = "denoiser"
    summary = "merge a block's most similar tokens into one random destination per 2×2 cell before its attention and " \
              "unmerge after it (the residual stream keeps its tokens), in every block at the finest resolutions"
    paper = "Token Merging for Fast Stable Diffusion (CVPR Workshops 2023)"
    zero = {"ratio": 0.0}

    ratio: object = option(0.5, "share of each reduced block's tokens merged (at most 1 - 1/(sx*sy)): a number, a list "
                                "(one per denoising step) or a function of the timestep")
    max_downsample: int = option(1, "reduce blocks at most this much below the finest resolution (1, 2, 4 or 8); "
                                    "transformers: 1 is their patch grid")
    sx: int = option(2, "cell width: one destination token per sx × sy cell")
    sy: int = option(2, "cell height")
    use_rand: bool = option(True, "a random destination in each cell (False: the top-left one)")
    merge_attn: bool = option(True, "merge before self-attention (joint text-image attention: the image tokens)")
    merge_crossattn: bool = option(False, "merge before cross-attention (its queries)")
    merge_mlp: bool = option(False, "merge before the MLP")
    seed: object = option(None, "seed of the cells' own generator (None: a fork of the global RNG at the first call, "
                                "as the published code does)")

    def validate(self) -> None:
        if self.sx < 1 or self.sy < 1:
            raise ScheduleError(f"sx and sy are cell sizes in tokens, at least 1; got {self.sx}, {self.sy}")
        if self.max_downsample not in (1, 2, 4, 8):
            raise ScheduleError(f"max_downsample is 1, 2, 4 or 8, got {self.max_downsample}")
        top = 1 - 1 / (self.sx * self.sy)
        values = [] if callable(self.ratio) else list(self.ratio) if isinstance(self.ratio, (list, tuple)) \
            else [self.ratio]
        if not callable(self.ratio) and not values:
            raise ScheduleError("ratio: give a number, a non-empty list (one per step) or a function of the timestep")
        for v in values:
            if not isinstance(v, (int, float)) or not 0 <= v <= top:
                raise ScheduleError(f"ratio is the share of tokens merged, in [0, {top:g}] for {self.sx}×{self.sy} "
                                    f"cells; got {v!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ScheduleError(f"seed is an int or None, got {self.seed!r}")
        if not self.ops():
            raise ScheduleError("merge_attn, merge_crossattn and merge_mlp are all off: nothing would be merged; turn "
                                "on at least one (the published default: merge_attn=True)")

    def ops(self) -> frozenset[str]:
        return frozenset(k for k, on in (("attn", self.merge_attn), ("crossattn", self.merge_crossattn),
                                         ("mlp", self.merge_mlp)) if on)

    def options(self) -> dict:
        out = {k: v for k, v in super().options().items() if k != "restore_tokens"}
        if callable(self.ratio):
            out["ratio"] = getattr(self.ratio, "__name__", "function")
        return out

    @classmethod
    def describe_options(cls):
        return [o for o in super().describe_options() if o[0] != "restore_tokens"]

    def apply(self, graph):
        raise RecipeError("'tomesd' reduces diffusion denoisers (diffusers UNets and transformers) and their pipelines")
