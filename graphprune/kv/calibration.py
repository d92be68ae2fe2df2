"""Calibration for the cache recipes that fit themselves to text (KVQuant's datatypes, Palu's whitening): each layer's
key and value projection outputs on the user's calibration token ids, and their Fisher information."""

from __future__ import annotations

import torch

from graphprune.errors import RecipeError


def calibration_ids(model, calibration) -> torch.Tensor:
    """``calibration`` as (N, T) token ids on the model's device, checked: integers within the model's vocabulary."""
    hint = "give token ids, e.g. calibration=tokenizer(text, return_tensors='pt').input_ids"
    if isinstance(calibration, (str, bytes)):
        raise RecipeError(f"calibration takes token ids, not text: {hint}")
    try:
        ids = torch.as_tensor(calibration)
    except (TypeError, ValueError, RuntimeError) as err:
        raise RecipeError(f"calibration must be token ids ((N, T) or (T,) integers): {hint} ({err})") from None
    embeddings = model.get_input_embeddings()
    vocab = embeddings.num_embeddings
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool or ids.dim() not in (1, 2) \
            or ids.numel() == 0:
        raise RecipeError(f"calibration must be token ids, integers shaped (N, T) or (T,); got {tuple(ids.shape)} "
                          f"{ids.dtype}: {hint}")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise RecipeError(f"calibration token ids must lie in [0, {vocab}) (the model's vocabulary); got "
                          f"{int(ids.min())}..{int(ids.max())}: tokenize with the model's own tokenizer")
    ids = ids.to(device=embeddings.weight.device, dtype=torch.long)
    return ids[None] if ids.dim() == 1 else ids


def _pass(model, row: torch.Tensor, info, fisher: bool):
    """One calibration sequence through the model: per layer and projection (0: keys, 1: values) its input, its output
    and, with ``fisher``, the language-model loss's gradient with respect to that output (else None)."""
    captured = []

    def hook(i, which):
        def grab(module, args, out):  # a zero added to the output carries the loss's gradient with respect to it
            if which is None:  # fused q/k/v (Phi-3): the key and value columns
                keys, values = info.fused_kv()
                parts = [out[..., keys], out[..., values]]
                zeros = [torch.zeros_like(p, requires_grad=fisher) for p in parts]
                captured.extend([(i, 0, args[0], parts[0], zeros[0]), (i, 1, args[0], parts[1], zeros[1])])
                return torch.cat([out[..., :keys.start], parts[0] + zeros[0], parts[1] + zeros[1]], -1)
            zero = torch.zeros_like(out, requires_grad=fisher)
            captured.append((i, which, args[0], out, zero))
            return out + zero
        return grab

    handles = []
    for i, layer in enumerate(model.get_decoder().layers):
        attn = layer.self_attn
        if hasattr(attn, "qkv_proj"):
            handles.append(attn.qkv_proj.register_forward_hook(hook(i, None)))
        else:
            handles.append(attn.k_proj.register_forward_hook(hook(i, 0)))
            handles.append(attn.v_proj.register_forward_hook(hook(i, 1)))
    try:
        # (normal mode even when called under torch.inference_mode: gradients need tensors autograd can save)
        with torch.inference_mode(False), torch.enable_grad() if fisher else torch.no_grad():
            row = row.clone()
            out = model(row[None], labels=row[None] if fisher else None, use_cache=False)
            grads = torch.autograd.grad(out.loss, [c[4] for c in captured]) if fisher else [None] * len(captured)
    finally:
        for h in handles:
            h.remove()
    return [(i, which, x.detach()[0].float(), y.detach()[0].float(), None if g is None else g[0].float())
            for (i, which, x, y, _), g in zip(captured, grads)]


def _collect(model, calibration, info, fisher: bool, weights: bool = False):
    """One pass per calibration sequence: per layer, the key and value projections' outputs stacked (N, T, H), their
    squared output gradients (ones without ``fisher``) and, with ``weights``, the root mean over the sequences of each
    weight's squared gradient (the output's gradient times the input)."""
    ids = calibration_ids(model, calibration)
    n_layers = len(model.get_decoder().layers)
    acts = [([], []) for _ in range(n_layers)]
    grads = [([], []) for _ in range(n_layers)]
    squares: list[list] = [[0.0, 0.0] for _ in range(n_layers)]
    for row in ids:
        for i, which, x, y, g in _pass(model, row, info, fisher or weights):
            acts[i][which].append(y)
            grads[i][which].append(g ** 2 if fisher else torch.ones_like(y))
            if weights:
                squares[i][which] = squares[i][which] + (g.T @ x) ** 2
    stack = lambda pair: tuple(torch.stack(p) for p in pair)  # noqa: E731
    fisher_weights = [tuple((t / len(ids)).sqrt() for t in pair) for pair in squares] if weights else None
    return [stack(a) for a in acts], [stack(g) for g in grads], fisher_weights


def calibrate(model, calibration, info, fisher: bool):
    """Each layer's key (pre-RoPE) and value projection outputs on ``calibration`` (a recipe's token ids: (N, T) or one
    sequence (T), a tensor or nested lists), each (N, T, H), and their Fisher information (the squared gradients of
    the language-model loss; ones where not asked), one sequence at a time. Reads the model and runs it; its weights'
    gradients are not touched."""
    acts, grads, _ = _collect(model, calibration, info, fisher)
    return acts, grads


def weight_fisher(model, calibration, info):
    """Per layer, the Fisher information of the key and value projections' weights on ``calibration``: the root mean
    over the sequences of each weight's squared gradient of the language-model loss (Palu's rank search: one sequence
    per backward pass), each (out, in) like the weight (fused q/k/v: its key and value rows); and, from the same
    passes, the projections' outputs as :func:`calibrate` gives them. The gradient of a weight is the output's
    gradient times the input, so the model's own weights' gradients are never touched."""
    acts, _, fisher = _collect(model, calibration, info, fisher=False, weights=True)
    return fisher, acts
