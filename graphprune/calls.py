"""How a call to the original model maps onto the inputs of its captured graph, so that the optimized model takes the
calls the original takes: positional, keyword, or ``**processor(...)``.

The graph takes the inputs it was captured with (the first parameters of the model's ``forward``, in order). Other
arguments of a call are dropped where they cannot change the output: left at their default, or all zeros where the
original model gives the same output with zeros as without the argument (checked once per argument, on the example
inputs: a tokenizer's ``token_type_ids`` for a single-segment BERT). Anything else is refused with what to do.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from graphprune.errors import GraphPruneError


def forward_signature(model) -> inspect.Signature | None:
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None


def example_tuple(model, example_inputs) -> tuple:
    """``example_inputs`` as the positional inputs of the model's forward: a tensor, a tuple, or a dict by name (the
    first parameters of ``forward``, in order, e.g. ``dict(tokenizer(texts, return_tensors="pt"))``)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if not isinstance(example_inputs, dict):
        return tuple(example_inputs)
    sig = forward_signature(model)
    params = [] if sig is None else [p for p in sig.parameters.values()
                                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in params]
    unknown = sorted(set(example_inputs) - set(names))
    if unknown:
        raise GraphPruneError(f"example_inputs name {', '.join(unknown)}, which the model's forward does not take "
                              f"({', '.join(names)})")
    last = max(names.index(k) for k in example_inputs)
    gaps = [n for n in names[:last + 1] if n not in example_inputs]
    if gaps:
        raise GraphPruneError(f"example_inputs must give the first parameters of the model's forward in order; add "
                              f"{', '.join(gaps)} (or leave out what comes after)")
    return tuple(example_inputs[n] for n in names[:last + 1])


@dataclass
class CallMap:
    """Maps a call of the original model to the captured graph's positional inputs."""

    model: torch.nn.Module  # the original (read, never changed): to check once whether an extra argument is neutral
    example: tuple  # the captured example inputs
    signature: inspect.Signature | None = None
    names: tuple[str, ...] = ()
    neutral: dict[str, bool] = field(default_factory=dict)

    def __post_init__(self):
        self.signature = forward_signature(self.model)
        if self.signature is not None:
            params = list(self.signature.parameters)
            self.names = tuple(params[:len(self.example)])

    def __call__(self, args: tuple, kwargs: dict) -> tuple:
        if not kwargs and len(args) == len(self.example) or self.signature is None:
            return args  # (the captured call)
        try:
            given = self.signature.bind_partial(*args, **kwargs).arguments
        except TypeError as err:
            raise GraphPruneError(f"the model does not take this call: {err}") from None
        missing = [n for n in self.names if given.get(n) is None]
        if missing:
            raise GraphPruneError(f"this optimized model was captured with {', '.join(self.names)}; pass "
                                  f"{', '.join(missing)} too (or optimize with example_inputs that leave it out)")
        for name, value, default in self._extras(given):
            if self._inert(name, value, default):
                continue
            if isinstance(value, torch.Tensor):
                raise GraphPruneError(
                    f"this optimized model was captured without {name}, and this value changes what the model "
                    f"computes; optimize with example_inputs that include it (e.g. "
                    f"example_inputs=dict(tokenizer(texts, return_tensors='pt')))")
            raise GraphPruneError(f"this optimized model computes the call it was captured with; {name}={value!r} "
                                  "would change that: leave it out")
        return tuple(given[n] for n in self.names)

    def _extras(self, given: dict):
        """(name, value, default) of each argument of the call that the graph does not take."""
        for name, value in given.items():
            if name in self.names:
                continue
            param = self.signature.parameters[name]
            if param.kind is param.VAR_KEYWORD:
                yield from ((k, v, inspect.Parameter.empty) for k, v in value.items())
            elif param.kind is param.VAR_POSITIONAL:
                yield from ((f"{name}[{i}]", v, inspect.Parameter.empty) for i, v in enumerate(value))
            else:
                yield name, value, param.default

    def _inert(self, name: str, value, default) -> bool:
        if value is None or (default is not inspect.Parameter.empty and value is default):
            return True
        if isinstance(value, (bool, int, float, str)):
            return default is not inspect.Parameter.empty and not isinstance(default, torch.Tensor) and value == default
        if isinstance(value, torch.Tensor) and not bool(value.any()):
            if name not in self.neutral:
                self.neutral[name] = self._zeros_change_nothing(name, value)
            return self.neutral[name]
        return False

    def _zeros_change_nothing(self, name: str, value: torch.Tensor) -> bool:
        """Whether the original gives the same output on the example inputs with ``name`` all zeros as without it."""
        batch = next(t.shape[0] for t in self.example if isinstance(t, torch.Tensor))
        zeros = torch.zeros(batch, *value.shape[1:], dtype=value.dtype, device=value.device)
        try:
            with torch.no_grad():
                plain = self.model(*self.example)
                with_zeros = self.model(*self.example, **{name: zeros})
        except Exception:  # noqa: BLE001 (the argument does not fit the example: not known to be neutral)
            return False
        a, _ = torch.utils._pytree.tree_flatten(plain)
        b, _ = torch.utils._pytree.tree_flatten(with_zeros)
        return len(a) == len(b) and all(
            not isinstance(x, torch.Tensor) or (isinstance(y, torch.Tensor) and x.shape == y.shape and torch.equal(x, y))
            for x, y in zip(a, b))
