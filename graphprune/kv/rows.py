"""The prompt-rows stage: at a layer boundary a policy picks which token rows go on (PyramidInfer).

A policy that prunes the prompt returns, from :meth:`CachePolicy.rows` in a layer's attention
call, the rows of that layer's tokens that go on to the next layer (``Call.chosen``). Hooks on
the copy's decoder layers then gather the layer's output, and give every later layer the
matching rows of the position embeddings, position ids and attention mask (``Call.kept``). The
kept tokens keep their original positions. Logits come out for the tokens that reached the top
(the last token always does).
"""

from __future__ import annotations

import torch

from graphprune.kv.cache import EvictingCache


def _take(t: torch.Tensor, kept: torch.Tensor, *dims: int) -> torch.Tensor:
    """Rows ``kept`` (B, n) of ``t`` along each of ``dims`` (a batch of 1 is broadcast first)."""
    if t.shape[0] != kept.shape[0]:
        t = t.expand(kept.shape[0], *t.shape[1:])
    for d in dims:
        shape = [kept.shape[0]] + [1] * (t.dim() - 1)
        shape[d] = kept.shape[1]
        t = t.gather(d, kept.reshape(shape).expand(*[kept.shape[1] if i == d else t.shape[i] for i in range(t.dim())]))
    return t


def _call(kwargs):
    """The current forward's :class:`~graphprune.kv.cache.Call`, from the cache passed to a decoder layer."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return cache.call if isinstance(cache, EvictingCache) else None


def install(model) -> None:
    """Hooks on the decoder layers of ``model`` (graphprune's own copy) that carry out prompt pruning."""
    layers = model.get_decoder().layers

    def before(module, args, kwargs):
        call = _call(kwargs)
        kept = None if call is None else call.kept
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

    def after(module, args, kwargs, output):
        call = _call(kwargs)
        chosen = None if call is None else call.chosen
        if chosen is None:
            return None
        call.chosen = None
        call.kept = chosen if call.kept is None else call.kept.gather(1, chosen)
        return _take(output, chosen, 1)

    for layer in layers:
        layer.register_forward_pre_hook(before, with_kwargs=True)
        layer.register_forward_hook(after, with_kwargs=True)
