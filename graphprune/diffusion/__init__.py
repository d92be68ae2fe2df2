"""Diffusion denoisers (diffusers UNets and transformers) and their pipelines: ToMe for Stable Diffusion.

``graphprune.optimize(pipe, recipe="tomesd", ratio=0.5)`` returns a pipeline whose denoiser is a reduced copy
(:class:`~graphprune.diffusion.denoiser.ReducedDenoiser`); the user's pipeline and modules are untouched.
"""

from __future__ import annotations

import copy

from graphprune.diffusion import recipes  # noqa: F401  (registers tomesd)
from graphprune.diffusion.denoiser import ReducedDenoiser, Settings, check_denoiser, denoiser_of, is_diffusion
from graphprune.errors import GraphPruneError, RecipeError

__all__ = ["ReducedDenoiser", "is_diffusion", "optimize_diffusion"]


def optimize_diffusion(model, recipe, target: str = "eager", output=None, example_inputs=None):
    """A reduced copy of a diffusers denoiser, or a copy of a pipeline holding one (its other modules shared);
    ``target="onnx"``: the reduced denoiser exported to the folder ``output``
    (:class:`~graphprune.exporters.denoiser_onnx.OnnxDenoiser`); ``"openvino"``, ``"trt"`` and ``"triton"``: the same,
    deployed (:func:`~graphprune.exporters.denoiser_onnx.deploy_denoiser`)."""
    if getattr(recipe, "kind", None) != "denoiser":
        raise RecipeError(f"'{recipe.name}' does not apply to diffusion models; use recipe='tomesd'")
    name, denoiser = denoiser_of(model)
    check_denoiser(denoiser)
    if target not in ("eager", "onnx", "openvino", "trt", "triton"):
        raise GraphPruneError(f"diffusion denoisers lower to target='eager', 'onnx', 'openvino', 'trt' or 'triton' "
                              f"(one denoising step), not '{target}'")
    if target != "eager" and output is None:
        raise GraphPruneError(f"target='{target}' needs output='folder' (denoiser.onnx is written there; triton: "
                              "output='repo/NAME')")
    settings = Settings(max_downsample=recipe.max_downsample, sx=recipe.sx, sy=recipe.sy, use_rand=recipe.use_rand,
                        ops=recipe.ops())
    reduced = ReducedDenoiser(denoiser, settings, recipe.ratio, recipe.seed)
    if target != "eager":
        from graphprune.exporters.denoiser_onnx import deploy_denoiser, export_denoiser_onnx

        if target == "onnx":
            return export_denoiser_onnx(reduced, example_inputs, output)
        return deploy_denoiser(reduced, example_inputs, output, target)
    if name is None:
        return reduced
    pipe = copy.copy(model)  # the same components, but its own attribute for the denoiser
    object.__setattr__(pipe, name, reduced)
    return pipe
