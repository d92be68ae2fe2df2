"""Image-token reduction before a vision-language model's language model.

A policy picks which of each image's projected tokens go in (:meth:`CachePolicy.image_tokens`), or gives each image
new, fewer tokens (:meth:`CachePolicy.merge_image`, which come first in the image's place); the image
placeholders in ``input_ids`` shrink with them, so the model's own merge of image features into the text embeddings
still matches. Kept tokens keep their positions: for positions and for the cache's length the sequence is as long as
before, as if the dropped tokens had been evicted before the first layer, so decoding goes on at the positions the
unreduced sequence would have (``generate`` needs nothing else). A policy that renumbers (:meth:`CachePolicy.renumbers`,
as DivPrune's code does) closes the kept tokens up instead; later calls' positions, which ``generate`` counts over the
whole prompt, then move down by the tokens each sequence lost (always so for merged tokens: they have no positions
of their own).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from graphprune.kv.model import positions
from graphprune.kv.policy import CachePolicy
from graphprune.kv.rows import compact

VISION_ARGUMENTS = ("pixel_values", "image_sizes", "image_grid_thw", "vision_feature_layer",
                    "vision_feature_select_strategy")


@dataclass
class VisionTokens:
    """What came before the projector, for a model that makes one image one grid of tokens (LLaVA-1.5).

    ``hidden`` (1 + n, Cv): the vision tower's hidden states at the layer the model takes, class token first;
    ``layers``: the vision tower's encoder layers (read them, never change them); ``projector``: the model's
    multimodal projector (Cv -> C)."""

    hidden: torch.Tensor
    layers: torch.nn.ModuleList
    projector: torch.nn.Module

    def queries_keys(self, layer: int, hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The query and key projections (1 + n, Cv) of encoder layer ``layer`` applied to ``hidden`` (default: the
        taken hidden states) after that layer's first norm: all heads side by side, unscaled."""
        block = self.layers[layer]
        x = block.layer_norm1(self.hidden if hidden is None else hidden)
        return block.self_attn.q_proj(x), block.self_attn.k_proj(x)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (k, Cv) of the vision tower through the projector: what the language model takes (k, C)."""
        return self.projector(tokens)


@dataclass
class ImageView:
    """One image before the language model: ``features`` (n, C), the projected tokens the language model would take,
    and ``vision`` (None where an image is several tiles, LLaVA-NeXT)."""

    features: torch.Tensor
    vision: VisionTokens | None = None


@dataclass
class VideoView:
    """One video before the language model: ``features`` (n, C), the projected tokens the language model would take,
    frame by frame (``frames`` of n // frames tokens each, in the same spatial order)."""

    features: torch.Tensor
    frames: int


def reduce_images(model, policy: CachePolicy, media: tuple[int, ...], kwargs: dict,
                  encoder=None) -> tuple[dict, int, torch.Tensor | None]:
    """The forward's keyword arguments with the image (and video) tokens ``policy`` leaves out gone (``media``: the
    image and video placeholder ids; ``encoder``: the policy's own image encoder, :meth:`CachePolicy.image_encoder`);
    how many slots the padded batch lost (0: nothing to do, no images in this call); and how many tokens each sequence
    lost (B,)."""
    ids = kwargs.get("input_ids")
    if ids is None:
        return kwargs, 0, None
    keep = torch.ones_like(ids, dtype=torch.bool)
    outputs = {}
    encoded = None
    if encoder is None:
        encoded = _encoded(model, kwargs, "image")
    elif kwargs.get("pixel_values") is not None:
        outputs["image"] = _own_encoder(encoder, kwargs["pixel_values"], ids == media[0], keep)
    if encoded is not None and policy.reduces_images:
        vision = _vision_tokens(model, encoded, kwargs, len(encoded.pooler_output))

        def image(i, f, at):
            view = ImageView(f, None if vision is None else vision[i])
            merged = policy.merge_image(view)
            if merged is not None:  # new tokens, in the first places of the image
                return torch.arange(merged.shape[0], device=f.device), merged.to(f.dtype)
            chosen = policy.image_tokens(view)
            return chosen, f if chosen is None else f[chosen]

        outputs["image"] = _reduce_each(ids == media[0], encoded, image, keep)
    encoded = _encoded(model, kwargs, "video") if len(media) > 1 and policy.reduces_videos else None
    if encoded is not None:
        grids, pos = kwargs.get("video_grid_thw"), kwargs.get("position_ids")

        def video(i, f, at):
            if grids is not None:
                frames = int(grids[i][0])
            else:  # (generate encodes videos itself and passes no grid: the frames are the video's distinct times)
                frames = len(torch.unique(pos[1, at[:, 0], at[:, 1]]))
            chosen = policy.video_tokens(VideoView(f, frames))
            return chosen, f if chosen is None else f[chosen]

        outputs["video"] = _reduce_each(ids == media[1], encoded, video, keep)
    outputs = {k: v for k, v in outputs.items() if v is not None}
    if not outputs:
        return kwargs, 0, None
    mask = kwargs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    pos = kwargs.get("position_ids")  # (B, T), or rows of them (multimodal RoPE: graphprune.kv.mrope)
    pos = positions(mask) if pos is None else pos.expand(*pos.shape[:-2], *ids.shape)
    order, real = kept_order(keep)
    pad = model.config.get_text_config().pad_token_id
    new_mask = (mask.gather(1, order) * real).to(mask.dtype)
    if policy.renumbers():  # the kept tokens close up, as the shorter sequence numbers them
        new_pos = positions(new_mask)
    else:
        new_pos = pos.gather(-1, order.expand(*pos.shape[:-2], *order.shape))
    out = dict(kwargs)
    for name, value in kwargs.items():  # per-token arguments follow the tokens (Qwen2-VL's mm_token_type_ids)
        if name not in ("input_ids", "attention_mask", "position_ids") and isinstance(value, torch.Tensor) \
                and value.shape == ids.shape:
            out[name] = value.gather(1, order)
    out.update(input_ids=ids.gather(1, order).masked_fill(~real, 0 if pad is None else pad),
               attention_mask=new_mask, position_ids=new_pos,
               mm_encoder_outputs={**(kwargs.get("mm_encoder_outputs") or {}), **outputs})
    for kind in outputs:
        out[PIXELS[kind]] = None
    out.pop("cache_position", None)
    return out, ids.shape[1] - order.shape[1], (~keep).sum(-1)


def kept_order(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's kept tokens ``keep`` (B, T) in order, left-padded to the longest: their indices (B, T') and
    which of those are kept tokens (B, T') (the rest: padding)."""
    real, order = compact(keep, torch.arange(keep.shape[1], device=keep.device).expand_as(keep))
    return order, real


PIXELS = {"image": "pixel_values", "video": "pixel_values_videos"}


def _encoded(model, kwargs: dict, kind: str):
    """The model's encoder output for this call's images or videos (``kind``), computed here unless given; None:
    none in this call."""
    encoded = (kwargs.get("mm_encoder_outputs") or {}).get(kind)
    if encoded is not None or kwargs.get(PIXELS[kind]) is None:
        return encoded
    if kind == "video":
        return model.model.get_video_features(pixel_values_videos=kwargs["pixel_values_videos"],
                                              video_grid_thw=kwargs.get("video_grid_thw"), return_dict=True)
    vision = {k: kwargs[k] for k in VISION_ARGUMENTS if kwargs.get(k) is not None}
    return model.model.get_image_features(**vision, return_dict=True)


def _own_encoder(encoder, pixel_values: torch.Tensor, placeholders: torch.Tensor, keep: torch.Tensor):
    """The images through the policy's own encoder: each image's k tokens take the first k of its placeholders (one
    image after another, n each), the others are marked left out in ``keep``; the encoder output for the model (None:
    the placeholders do not match the images: the model's own check reports that)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    tokens = encoder(pixel_values)  # [(k_i, C)]
    where = placeholders.nonzero()
    if len(where) % len(tokens):
        return None
    n = len(where) // len(tokens)
    for i, t in enumerate(tokens):
        gone = where[i * n + len(t):(i + 1) * n]
        keep[gone[:, 0], gone[:, 1]] = False
    return BaseModelOutputWithPooling(pooler_output=tokens)


def _reduce_each(placeholders: torch.Tensor, encoded, reduce, keep: torch.Tensor):
    """Reduce each entry of ``encoded``'s features by ``reduce(i, features, placeholders) -> (kept indices or None, new
    features)`` (``placeholders``: where its tokens are, (n, 2) (sequence, index)),
    marking the placeholders (B, T) of the tokens left out in ``keep``; returns the encoder output with the new
    features (None: the placeholders do not match the features: the model's own check reports that)."""
    features = list(encoded.pooler_output)
    where = placeholders.nonzero()  # (tokens, 2): their (sequence, index), in the order the features fill them
    if len(where) != sum(f.shape[0] for f in features):
        return None
    kept, start = [], 0
    for i, f in enumerate(features):
        n = f.shape[0]
        at = where[start:start + n]
        chosen, f = reduce(i, f, at)
        if chosen is not None:
            gone = torch.ones(n, dtype=torch.bool, device=f.device)
            gone[chosen] = False
            keep[at[gone][:, 0], at[gone][:, 1]] = False
        kept.append(f)
        start += n
    return dataclasses.replace(encoded, pooler_output=kept if isinstance(encoded.pooler_output, (list, tuple))
                               else torch.cat(kept))


def _vision_tokens(model, encoded, kwargs: dict, images: int) -> list[VisionTokens] | None:
    """What came before the projector, per image, for one-grid images with a class token (LLaVA-1.5); None
    otherwise."""
    config = model.config
    if config.model_type != "llava":
        return None
    layer = kwargs.get("vision_feature_layer") or config.vision_feature_layer
    strategy = kwargs.get("vision_feature_select_strategy") or config.vision_feature_select_strategy
    states = getattr(encoded, "hidden_states", None)
    if not isinstance(layer, int) or strategy != "default" or states is None:
        return None
    hidden = states[layer]
    tower = model.model.vision_tower
    layers = getattr(getattr(getattr(tower, "vision_model", tower), "encoder", None), "layers", None)
    if hidden is None or hidden.shape[0] != images or layers is None:
        return None
    return [VisionTokens(h, layers, model.model.multi_modal_projector) for h in hidden]
