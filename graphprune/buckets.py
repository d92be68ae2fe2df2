"""Text models at any length: one graph with a symbolic length, or one captured graph per bucket length.

``graphprune.optimize(bert, "evit", example_inputs=tokenizer(texts, return_tensors="pt"), lengths=[64, 128, 256])``
with a recipe that fixes token counts when the model is optimized captures the model once per length (the example
padded, its attention mask zero over the padding). A recipe whose graph works out every count from the tokens it gets
(``Recipe.any_length``: ToMe) is captured once, at the longest length with a symbolic one (:func:`longest_example`).
With buckets, a call pads its
per-token inputs (token ids, attention mask, token types: every 2-D input of the call's sequence length) with zeros to
the smallest bucket that holds it, runs that bucket's graph, and cuts per-token outputs (3-D, of the bucket's length)
back to the call's length. With the attention mask zero over the padding, the real tokens' outputs do not depend on it:
at zero reduction every length equals the unmodified model.
"""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree

from graphprune.calls import example_tuple
from graphprune.capture import SHORTEST
from graphprune.errors import GraphPruneError


def bucket_lengths(lengths) -> list[int]:
    try:
        out = sorted({int(n) for n in lengths})
    except (TypeError, ValueError):
        raise GraphPruneError(f"lengths must be token counts, e.g. [64, 128, 256]; got {lengths!r}") from None
    if not out or out[0] < 1:
        raise GraphPruneError(f"lengths must be positive token counts, e.g. [64, 128, 256]; got {lengths!r}")
    return out


def check_length(n: int, max_tokens: int) -> None:
    """Refuse a call of ``n`` tokens to a graph with a symbolic length captured for SHORTEST to ``max_tokens``."""
    if not SHORTEST <= n <= max_tokens:
        raise GraphPruneError(f"this model was captured for {SHORTEST} to {max_tokens} tokens; the call has {n}: "
                              "optimize with a longer length in lengths=[...]")


def padded(example: tuple, length: int) -> tuple:
    """The example inputs with every 2-D tensor of the first input's sequence length padded (or cut) to ``length``."""
    n = example[0].shape[1]

    def fit(t):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[1] != n:
            return t
        if length <= n:
            return t[:, :length]
        return torch.nn.functional.pad(t, (0, length - n))

    return tuple(fit(t) for t in example)


class Bucketed(torch.nn.Module):
    """Optimized models captured at several sequence lengths; a call runs the smallest that holds it."""

    def __init__(self, models: dict[int, torch.nn.Module]):
        super().__init__()
        self.lengths = sorted(models)
        self.buckets = torch.nn.ModuleDict({str(n): m for n, m in models.items()})
        self.report = models[self.lengths[-1]].report

    def forward(self, *args, **kwargs):
        first = self.buckets[str(self.lengths[0])]
        inputs = first.calls(args, kwargs) if first.calls is not None else args
        n = inputs[0].shape[1]
        fits = [length for length in self.lengths if length >= n]
        if not fits:
            raise GraphPruneError(f"this model was captured at lengths up to {self.lengths[-1]} tokens; the call has "
                                  f"{n}: optimize with a larger bucket in lengths=[...]")
        length = fits[0]
        out = self.buckets[str(length)](*padded(tuple(inputs), length))
        return pytree.tree_map(lambda t: t[:, :n] if isinstance(t, torch.Tensor) and t.dim() == 3 and
                               t.shape[1] == length else t, out)


def one_graph(recipe) -> bool:
    """Whether ``lengths=[...]`` captures ``recipe`` once with a symbolic sequence length (a token recipe that works
    out its counts from the tokens it gets: ``Recipe.any_length``) rather than once per bucket length."""
    return getattr(recipe, "kind", None) == "tokens" and recipe.any_length()


def _text_example(model, example_inputs) -> tuple:
    if example_inputs is None:
        raise GraphPruneError("lengths=[...] captures a text model at its longest length: give example_inputs (e.g. "
                              "tokenizer(texts, return_tensors='pt'))")
    example = example_tuple(model, example_inputs)
    if not isinstance(example[0], torch.Tensor) or example[0].dim() != 2:
        raise GraphPruneError("lengths=[...] is for text models whose first input is token ids (B, L)")
    return example


def longest_example(model, example_inputs, lengths) -> tuple[tuple, int]:
    """For a recipe that works out its token counts from the tokens it gets (``Recipe.any_length``): the example padded
    to the longest length, and that length. Captured there with a symbolic length, the graph serves every shorter
    length as captured at it (no block merges more on a shorter call)."""
    longest = bucket_lengths(lengths)[-1]
    return padded(_text_example(model, example_inputs), longest), longest


def optimize_buckets(optimize, model, recipe, example_inputs, lengths, options: dict) -> Bucketed:
    """``optimize`` (graphprune.optimize, eager) once per bucket length with the example padded to it."""
    example = _text_example(model, example_inputs)
    if options.get("restore_tokens") is False:
        raise GraphPruneError("lengths=[...] cuts per-token outputs back to each call's length: it needs "
                              "restore_tokens=True")
    return Bucketed({n: optimize(model, recipe, example_inputs=padded(example, n), **options)
                     for n in bucket_lengths(lengths)})
