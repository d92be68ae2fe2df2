"""Image-token reduction before a vision-language model's language model.

A policy picks which of each image's projected tokens go in (:meth:`CachePolicy.image_tokens`); the image
placeholders in ``input_ids`` shrink with them, so the model's own merge of image features into the text embeddings
still matches. Kept tokens keep their positions: for positions and for the cache's length the sequence is as long as
before, as if the dropped tokens had been evicted before the first layer, so decoding goes on at the positions the
unreduced sequence would have (``generate`` needs nothing else). A policy that renumbers (:meth:`CachePolicy.renumbers`,
as DivPrune's code does) closes the kept tokens up instead; later calls' positions, which ``generate`` counts over the
whole prompt, then move down by the tokens each sequence lost.
"""

from __future__ import annotations

import dataclasses

import torch

from graphprune.kv.policy import CachePolicy

VISION_ARGUMENTS = ("pixel_values", "image_sizes", "vision_feature_layer", "vision_feature_select_strategy")


def reduce_images(model, policy: CachePolicy, image_token: int, kwargs: dict) -> tuple[dict, int, torch.Tensor | None]:
    """The forward's keyword arguments with the image tokens ``policy`` leaves out gone; how many slots the padded
    batch lost (0: nothing to do, no images in this call); and how many tokens each sequence lost (B,)."""
    ids, encoded = kwargs.get("input_ids"), (kwargs.get("mm_encoder_outputs") or {}).get("image")
    if ids is None or (encoded is None and kwargs.get("pixel_values") is None):
        return kwargs, 0, None
    if encoded is None:
        vision = {k: kwargs[k] for k in VISION_ARGUMENTS if kwargs.get(k) is not None}
        encoded = model.model.get_image_features(**vision, return_dict=True)
    features = list(encoded.pooler_output)
    image = ids == image_token
    where = image.nonzero()  # (image tokens, 2): their (sequence, index), in the order the features fill them
    if len(where) != sum(f.shape[0] for f in features):
        return kwargs, 0, None  # (the model's own check reports the mismatch)
    keep, kept, start = torch.ones_like(image), [], 0
    for f in features:
        n = f.shape[0]
        chosen = policy.image_tokens(f)
        if chosen is not None:
            gone = torch.ones(n, dtype=torch.bool, device=f.device)
            gone[chosen] = False
            at = where[start:start + n][gone]
            keep[at[:, 0], at[:, 1]] = False
            f = f[chosen]
        kept.append(f)
        start += n
    mask = kwargs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    pos = kwargs.get("position_ids")
    pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1) if pos is None else pos.expand_as(ids)
    # each sequence's kept tokens in order, left-padded to the longest
    length = int(keep.sum(-1).max())
    index = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    order = torch.where(keep, index, -1).argsort(dim=-1, stable=True)[:, -length:]
    real = keep.gather(1, order)
    pad = model.config.get_text_config().pad_token_id
    new_mask = (mask.gather(1, order) * real).to(mask.dtype)
    if policy.renumbers():  # the kept tokens close up, as the shorter sequence numbers them
        new_pos = (new_mask.long().cumsum(-1) - 1).masked_fill(new_mask == 0, 1)
    else:
        new_pos = pos.gather(1, order)
    out = dict(kwargs)
    out.update(input_ids=ids.gather(1, order).masked_fill(~real, 0 if pad is None else pad),
               attention_mask=new_mask, position_ids=new_pos,
               mm_encoder_outputs={**(kwargs.get("mm_encoder_outputs") or {}),
                                   "image": dataclasses.replace(encoded, pooler_output=kept)},
               pixel_values=None)
    out.pop("cache_position", None)
    return out, ids.shape[1] - length, (~keep).sum(-1)
