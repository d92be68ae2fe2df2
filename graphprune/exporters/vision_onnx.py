"""A vision-language model to ONNX, run by ONNX Runtime.

The image side (:func:`export_image_reducer`): pixels → vision tower → projector → the image tokens a fixed-count
before-LLM recipe keeps (DivPrune). The graph takes ``pixel_values`` (images, 3, H, W; the batch of images is dynamic)
and gives ``image_tokens`` (images, k, C): what goes into the language model in place of each image's k placeholders,
and ``kept`` (images, k): which of the image's n tokens they are (their positions in the full prompt, for a runtime
that keeps positions).

With a fixed-budget cache policy too (:func:`export_vlm_onnx`, e.g. ``["divprune", "snapkv"]``) the language model
follows: a prefill graph that takes the shortened prompt, its kept positions and the image tokens, and the decoder's
static-shape decode step; :class:`OnnxVLM` runs the three. Image tokens pruned inside the language model at a count
fixed by the options (FastV, PyramidDrop) are pruned inside the prefill graph: every prompt brings the exported number
of image tokens, so each layer's rows are a static count. Each graph is checked against the eager model in ONNX
Runtime before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from graphprune.errors import ExportError, GraphPruneError
from graphprune.exporters.decoder_onnx import DecodeStep, OnnxDecoder, _export, publish_checked
from graphprune.exporters.files import publish, staging_dir
from graphprune.exporters.onnx import _session
from graphprune.kv.images import kept_order
from graphprune.kv.model import cache_argument, positions
from graphprune.kv.policy import CachePolicy, When

FIXED_GRID = ("llava", "paligemma", "gemma3")  # models whose every image is one fixed-size set of tokens
TOLERANCE = 1e-4


class ImageReducer(torch.nn.Module):
    """Pixels to the kept image tokens, with the model's own vision tower and projector."""

    def __init__(self, vlm, policy):
        super().__init__()
        self.vlm, self.policy = vlm, policy

    def forward(self, pixel_values):
        features = image_features(self.vlm, pixel_values)
        if self.policy.reduces_images:
            kept = self.policy.fixed_image_tokens(features)
        else:  # (a cache policy alone: every image token goes in)
            kept = torch.arange(features.shape[1], device=features.device).expand(features.shape[0], -1)
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


class VisionPrefill(torch.nn.Module):
    """The language model's prompt pass from the shortened prompt: the image tokens fill its placeholders."""

    def __init__(self, lm, extra: int, image_token: int, rows_plan: tuple[int, ...] | None = None):
        super().__init__()
        self.lm, self.extra, self.image_token, self.rows_plan = lm, extra, image_token, rows_plan

    def forward(self, input_ids, attention_mask, position_ids, image_tokens):
        embeds = self.lm.get_input_embeddings()(input_ids)
        embeds = embeds.masked_scatter((input_ids == self.image_token)[..., None], image_tokens.to(embeds.dtype))
        cache = self.lm.graphprune.new_cache(self.extra, self.rows_plan)
        cache.begin(input_ids)  # (the ids say which rows are image tokens; the language model gets the embeddings)
        decoder = self.lm.model.language_model
        out = decoder(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                      **{cache_argument(decoder): cache})
        return (self.lm.lm_head(out.last_hidden_state[:, -1]), *cache.flat())


def shorten(input_ids: torch.Tensor, attention_mask: torch.Tensor, kept: torch.Tensor, image_token: int):
    """The prompt without the image tokens left out: each image's placeholders (in order, one image after another) keep
    the ``kept`` (images, k) of theirs; returns the shortened ids, mask and the kept tokens' positions (left padded)."""
    where = (input_ids == image_token).nonzero()
    per = len(where) // kept.shape[0]
    keep = torch.ones_like(input_ids, dtype=torch.bool)
    for i in range(kept.shape[0]):
        mine = where[i * per:(i + 1) * per]
        gone = torch.ones(per, dtype=torch.bool)
        gone[kept[i]] = False
        keep[mine[gone][:, 0], mine[gone][:, 1]] = False
    order, real = kept_order(keep)
    mask = attention_mask.gather(1, order) * real
    return input_ids.gather(1, order).masked_fill(~real, 0), mask, positions(attention_mask).gather(1, order)


class OnnxVLM(OnnxDecoder):
    """A vision-language model exported by :func:`export_vlm_onnx`: greedy generation in ONNX Runtime."""

    def __init__(self, folder, threads: int | None = None):
        super().__init__(folder, threads)
        self.vision = OnnxImageReducer(folder, threads)

    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 16) -> torch.Tensor:
        """Greedy generation from the full prompt (every image's placeholders) and its images (one after another in
        the order of the placeholders); returns the new tokens (B, max_new_tokens)."""
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        want = self.meta.get("image_tokens_per_prompt")
        if want is not None:
            have = (input_ids == self.meta["image_token_id"]).sum(-1)
            if bool((have != want).any()):
                raise GraphPruneError(f"this export prunes image tokens inside the language model at fixed counts: every "
                                      f"prompt must hold {want} image tokens (one image); these hold {have.tolist()}")
        tokens, kept = self.vision(pixel_values)
        ids, mask, pos = shorten(input_ids, attention_mask, kept, self.meta["image_token_id"])
        if ids.shape[1] != self.meta["prompt_len"]:
            raise GraphPruneError(f"this export takes prompts of {self.meta['prompt_len']} tokens once its images are "
                                  f"reduced (it was exported at that length); this one has {ids.shape[1]}")
        logits, *state = self.prefill.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                                                 "position_ids": pos.numpy(),
                                                 "image_tokens": tokens.reshape(-1, tokens.shape[-1]).numpy()})
        return self._decode(logits, state, attention_mask.sum(-1, keepdim=True).numpy().astype(np.int64),
                            max_new_tokens)


def export_vlm_onnx(vlm, output, max_new_tokens: int = 32, check_tokens: int = 8) -> OnnxVLM:
    """Export graphprune's copy of a LLaVA model whose policy pairs a fixed-share image recipe (before the language
    model: DivPrune; or inside it: FastV, PyramidDrop; or none) with a fixed-budget cache policy (or none, after an
    in-LLM recipe): vision.onnx, prefill.onnx, decode.onnx and decoder.json in ``output``. Checked before anything is
    written: greedy generation in ONNX Runtime equals the eager copy's, token for token, on a left-padded batch of two
    prompts with their images."""
    policy, config = vlm.graphprune.policy, vlm.config
    cache = getattr(policy, "cache", policy)
    if config.model_type != "llava":
        raise GraphPruneError(f"a vision-language model's language model exports to ONNX for LLaVA so far, not "
                              f"'{config.model_type}' (its image side exports alone: divprune with target='onnx')")
    n_layers = vlm.graphprune.info.n_layers
    if policy.prunes_rows and policy.image_rows_after(1, 0, n_layers) is None:
        raise GraphPruneError(f"'{policy.name}' stops a data-dependent number of rows inside the language model: its "
                              "prompt pass has no static shapes to export (fastv and pyramiddrop export); use "
                              "target='eager'")
    alone = cache.evicts is When.NEVER  # (an in-LLM recipe alone: each layer keeps the prompt's rows that reach it)
    if not alone and not cache.exportable:
        raise GraphPruneError(f"'{policy.name}' has no static-shape decode step to export (a cache that changes "
                              "size); use target='eager'")
    if not alone and isinstance(cache.budget, float):
        raise GraphPruneError("ONNX export needs a fixed budget: give budget as an int (cached tokens per layer)")
    if policy.reduces_images and (type(policy).fixed_image_tokens is CachePolicy.fixed_image_tokens or policy.renumbers()):
        raise GraphPruneError(f"'{policy.name}' keeps a data-dependent number of image tokens (or renumbers them): it "
                              "does not export to ONNX")
    extra = 0 if cache.evicts is When.STEP else max_new_tokens
    pixels = example_pixels(vlm)
    reducer = ImageReducer(vlm, policy).eval()
    with torch.no_grad():
        n = image_features(vlm, pixels[:1]).shape[1]
        g = torch.Generator().manual_seed(0)
        text = torch.randint(3, config.image_token_id, (2, 10), generator=g)
        full = torch.cat([text[:, :4], torch.full((2, n), config.image_token_id), text[:, 4:]], 1)
        mask = torch.ones_like(full)
        mask[1, :2] = 0  # (left padding in the example batch)
        tokens, kept = reducer(pixels)
        ids, short_mask, pos = shorten(full, mask, kept, config.image_token_id)
        plan, k = None, tokens.shape[1]  # (k: the image tokens that reach the language model)
        if policy.prunes_rows:  # each layer's rows: the prompt's, less the image tokens stopped up to there
            plan = tuple(ids.shape[1] - k + policy.image_rows_after(k, layer, n_layers) for layer in range(n_layers))
        prefill = VisionPrefill(vlm, extra, config.image_token_id, plan).eval()
        logits, *state = prefill(ids, short_mask, pos, tokens.reshape(-1, tokens.shape[-1]))
    names = vlm.graphprune.new_cache().state_names()
    per = len(names) // vlm.graphprune.info.n_layers
    capacities = [state[i * per].shape[2] - extra for i in range(n_layers)]
    decode = DecodeStep(vlm, capacities, extra, plan).eval()
    b = torch.export.Dim("batch", min=1, max=1024)
    output = Path(output)
    with staging_dir(output) as tmp:
        past, present = [f"past.{n}" for n in names], [f"present.{n}" for n in names]
        _export(reducer, (pixels,), ["pixel_values"], ["image_tokens", "kept"], tmp / "vision.onnx",
                {"pixel_values": {0: torch.export.Dim("images", min=1, max=1024)}})
        _export(prefill, (ids, short_mask, pos, tokens.reshape(-1, tokens.shape[-1])),
                ["input_ids", "attention_mask", "position_ids", "image_tokens"], ["logits", *present],
                tmp / "prefill.onnx", {"input_ids": {0: b}, "attention_mask": {0: b}, "position_ids": {0: b},
                                       "image_tokens": {0: torch.export.Dim("tokens", min=1, max=2**20)}})
        step_in = (ids[:, -1:], mask.sum(-1, keepdim=True), *state)
        _export(decode, step_in, ["input_ids", "position_ids", *past], ["logits", *present], tmp / "decode.onnx",
                {"input_ids": {0: b}, "position_ids": {0: b}, "state": tuple({0: b} for _ in state)})
        eos, pad = vlm.generation_config.eos_token_id, vlm.generation_config.pad_token_id
        meta = {"recipe": policy.name, "options": policy.options(), "prompt_len": int(ids.shape[1]),
                "eos_token_ids": [eos] if isinstance(eos, int) else list(eos or []), "pad_token_id": pad or 0,
                "max_new_tokens": max_new_tokens, "extra_slots": extra, "capacities": capacities, "state_names": names,
                "model_type": config.model_type, "image_token_id": config.image_token_id,
                "tokens_per_image": int(tokens.shape[1]), "pixel_shape": list(pixels.shape[1:]),
                "image_tokens_per_prompt": None if plan is None else n, "rows_per_layer": plan}
        (tmp / "decoder.json").write_text(json.dumps(meta, indent=2))
        (tmp / "vision.json").write_text(json.dumps(meta, indent=2))
        runner = OnnxVLM(tmp)
        with torch.no_grad():
            expected = vlm.generate(input_ids=full, attention_mask=mask, pixel_values=pixels,
                                    max_new_tokens=check_tokens, do_sample=False,
                                    pad_token_id=meta["pad_token_id"])[:, full.shape[1]:]
        publish_checked(runner.generate(full, pixels, mask, check_tokens)[:, :expected.shape[1]], expected, tmp, output)
    runner = OnnxVLM(output)
    runner.report = vlm.report
    return runner
