"""Prompt token pruning inside the prefill (PyramidInfer): later layers see fewer tokens.

A cache recipe that prunes the prompt picks, in a layer's attention call, the tokens that go
on to the next layer (``layer.inputs["select"]``: indices into that layer's tokens). Hooks on
the copy's decoder layers then gather the layer's output, and give every later layer the
matching rows of the position embeddings, position ids and attention mask. The kept tokens
keep their original positions. Logits come out for the tokens that reached the top (the last
token always does).
"""

from __future__ import annotations

import torch


def _take(t: torch.Tensor, kept: torch.Tensor, *dims: int) -> torch.Tensor:
    """Rows ``kept`` (B, n) of ``t`` along each of ``dims`` (a batch of 1 is broadcast first)."""
    if t.shape[0] != kept.shape[0]:
        t = t.expand(kept.shape[0], *t.shape[1:])
    for d in dims:
        shape = [kept.shape[0]] + [1] * (t.dim() - 1)
        shape[d] = kept.shape[1]
        t = t.gather(d, kept.reshape(shape).expand(*[kept.shape[1] if i == d else t.shape[i] for i in range(t.dim())]))
    return t


def install(model) -> None:
    """Hooks on the decoder layers of ``model`` (graphprune's own copy) that carry out prompt pruning."""
    layers = model.get_decoder().layers

    def before(module, args, kwargs):
        inputs = model.graphprune_inputs
        kept = inputs.get("kept") if inputs is not None else None
        if kept is None:
            return None
        kwargs = dict(kwargs)
        cos, sin = kwargs["position_embeddings"]
        kwargs["position_embeddings"] = (_take(cos, kept, 1), _take(sin, kept, 1))
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = _take(kwargs["position_ids"], kept, 1)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            kwargs["attention_mask"] = _take(mask, kept, 2, 3)
        return args, kwargs

    def after(module, args, output):
        inputs = model.graphprune_inputs
        select = inputs.pop("select", None) if inputs is not None else None
        if select is None:
            return None
        kept = inputs.get("kept")
        inputs["kept"] = select if kept is None else kept.gather(1, select)
        return _take(output, select, 1)

    for layer in layers:
        layer.register_forward_pre_hook(before, with_kwargs=True)
        layer.register_forward_hook(after)
