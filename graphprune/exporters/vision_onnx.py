"""A vision-language model's image side to ONNX: pixels → vision tower → projector → the image tokens a fixed-count
before-LLM recipe keeps (DivPrune), run by ONNX Runtime.

The graph takes ``pixel_values`` (images, 3, H, W; the batch of images is dynamic) and gives ``image_tokens``
(images, k, C): what goes into the language model in place of each image's k placeholders, and ``kept``
(images, k): which of the image's n tokens they are (their positions in the full prompt, for a runtime that keeps
positions). Checked against the eager model in ONNX Runtime before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from graphprune.errors import ExportError, GraphPruneError
from graphprune.exporters.decoder_onnx import _export
from graphprune.exporters.files import publish, staging_dir
from graphprune.exporters.onnx import _session
from graphprune.kv.policy import CachePolicy

FIXED_GRID = ("llava", "paligemma", "gemma3")  # models whose every image is one fixed-size set of tokens
TOLERANCE = 1e-4


class ImageReducer(torch.nn.Module):
    """Pixels to the kept image tokens, with the model's own vision tower and projector."""

    def __init__(self, vlm, policy):
        super().__init__()
        self.vlm, self.policy = vlm, policy

    def forward(self, pixel_values):
        features = image_features(self.vlm, pixel_values)
        kept = self.policy.fixed_image_tokens(features)
        return features.gather(1, kept[..., None].expand(*kept.shape, features.shape[-1])), kept


def image_features(vlm, pixel_values: torch.Tensor) -> torch.Tensor:
    """(images, n, C) the projected image tokens, as the model's ``get_image_features`` makes them, batched (LLaVA's
    splits them into a list per image, which would fix the batch of an export: its steps are taken here unsplit)."""
    inner, config = vlm.model, vlm.config
    if config.model_type != "llava":
        return inner.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
    hidden = inner.vision_tower(pixel_values, output_hidden_states=True).hidden_states[config.vision_feature_layer]
    if config.vision_feature_select_strategy == "default":
        hidden = hidden[:, 1:]  # (the class token)
    return inner.multi_modal_projector(hidden)


class OnnxImageReducer:
    """The exported image side: ``reducer(pixel_values)`` → (image_tokens, kept) from ONNX Runtime."""

    def __init__(self, folder, threads: int | None = None):
        folder = Path(folder)
        self.meta = json.loads((folder / "vision.json").read_text())
        self.session = _session(folder / "vision.onnx", threads)
        self.report = None

    def __call__(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, kept = self.session.run(None, {"pixel_values": pixel_values.detach().float().numpy()})
        return torch.from_numpy(tokens), torch.from_numpy(kept)


def example_pixels(vlm, images: int = 2) -> torch.Tensor:
    size = vlm.config.vision_config.image_size
    return torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(0))


def export_image_reducer(vlm, output, pixel_values: torch.Tensor | None = None) -> OnnxImageReducer:
    """Export the image side of ``vlm`` (graphprune's copy, whose policy reduces images by a fixed count) to
    ``output``/vision.onnx with vision.json; checked in ONNX Runtime on other pixels than the example's."""
    policy, kind = vlm.graphprune.policy, vlm.config.model_type
    if kind not in FIXED_GRID or not isinstance(getattr(vlm.config, "vision_feature_layer", -1), int):
        raise GraphPruneError(f"the image side of '{kind}' models does not export to ONNX (their images make varying "
                              f"numbers of tokens); models that export it: {', '.join(FIXED_GRID)}")
    if type(policy).fixed_image_tokens is CachePolicy.fixed_image_tokens:
        raise GraphPruneError(f"'{policy.name}' keeps a data-dependent number of image tokens: it does not export to "
                              "ONNX (divprune keeps a fixed share)")
    pixels = example_pixels(vlm) if pixel_values is None else pixel_values
    reducer = ImageReducer(vlm, policy).eval()
    with torch.no_grad():
        tokens, kept = reducer(pixels)
    output = Path(output)
    with staging_dir(output) as tmp:
        _export(reducer, (pixels,), ["pixel_values"], ["image_tokens", "kept"], tmp / "vision.onnx",
                {"pixel_values": {0: torch.export.Dim("images", min=1, max=1024)}})
        meta = {"recipe": policy.name, "options": policy.options(), "model_type": kind,
                "image_token_id": vlm.config.image_token_id, "tokens_per_image": int(tokens.shape[1]),
                "pixel_shape": list(pixels.shape[1:])}
        (tmp / "vision.json").write_text(json.dumps(meta, indent=2))
        runner = OnnxImageReducer(tmp)
        check = torch.randn(3, *pixels.shape[1:], generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            want_tokens, want_kept = reducer(check)
        got_tokens, got_kept = runner(check)
        if not torch.equal(got_kept, want_kept) or not np.allclose(got_tokens, want_tokens, atol=TOLERANCE):
            raise ExportError(f"ONNX Runtime's image tokens differ from eager ({float((got_tokens - want_tokens).abs().max()):.2e} "
                              "max difference, or another kept set); nothing was written")
        publish(sorted(tmp.iterdir()), output)
    runner = OnnxImageReducer(output)
    runner.report = vlm.report
    return runner
