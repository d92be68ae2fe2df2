"""Positions of vision-language models with multimodal RoPE (Qwen2-VL, Qwen2.5-VL).

Their language model rotates by three rows of positions (temporal, height, width: image tokens share a time and
count rows and columns) and numbers the tokens for causality and the cache by a fourth, the text positions. The model
builds the four rows itself only inside ``generate``; elsewhere its layers get no text positions. graphprune's copy
always passes all four (what ``generate`` would), so every layer knows each token's place in the sequence: the cache
orders, masks and evicts by the text row, and tokens dropped before or inside the language model keep all four.
"""

from __future__ import annotations

import inspect

import torch

from graphprune.kv.model import positions


def four_rows(model, kwargs: dict, past: int) -> dict:
    """The forward's keyword arguments with ``position_ids`` as the four rows (text, temporal, height, width) the
    model's ``generate`` passes; ``past``: tokens the cache holds already (padding and left-out tokens included)."""
    pos, ids, mask = kwargs.get("position_ids"), kwargs.get("input_ids"), kwargs.get("attention_mask")
    if pos is not None and pos.dim() == 3 and pos.shape[0] == 4:
        return kwargs
    tokens = ids if ids is not None else kwargs["inputs_embeds"]
    b, n = tokens.shape[:2]
    if mask is not None:
        text = positions(mask)[:, -n:]
    else:
        text = (past + torch.arange(n, device=tokens.device)).expand(b, n)
    if pos is None:
        inner = model.model
        if past == 0:  # the prompt: the model's own 3-D positions (and its rope deltas for later calls)
            names = inspect.signature(inner.compute_3d_position_ids).parameters
            given = {k: kwargs.get(k) for k in names if k not in ("self", "cache")}
            pos = inner.compute_3d_position_ids(**given, cache=None)
        elif inner.rope_deltas is not None:  # later calls go on where the prompt's 3-D positions ended
            delta = inner.rope_deltas
            pos = text + delta.repeat_interleave(b // delta.shape[0], dim=0).to(text.device)
        pos = text if pos is None else pos
    if pos.dim() == 2:
        pos = pos[None].expand(3, b, n)
    return {**kwargs, "position_ids": torch.cat([text[None].to(pos.device), pos], 0)}
