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


def calibrate(model, calibration, info, fisher: bool):
    """Each layer's key (pre-RoPE) and value projection outputs on ``calibration`` (a recipe's token ids: (N, T) or one
    sequence (T), a tensor or nested lists), each (N, T, H), and their Fisher information (the squared gradients of
    the language-model loss; ones where not asked), one sequence at a time. Reads the model and runs it; its weights'
    gradients are not touched."""
    ids = calibration_ids(model, calibration)
    layers = model.get_decoder().layers
    acts = [([], []) for _ in layers]
    grads = [([], []) for _ in layers]
    for row in ids:
        captured = []

        def hook(i, which):
            def grab(module, args, out):  # a zero added to the output carries the loss's gradient with respect to it
                if which is None:  # fused q/k/v (Phi-3): the key and value columns
                    keys, values = info.fused_kv()
                    parts = [out[..., keys], out[..., values]]
                    zeros = [torch.zeros_like(p, requires_grad=fisher) for p in parts]
                    captured.extend([(i, 0, parts[0], zeros[0]), (i, 1, parts[1], zeros[1])])
                    return torch.cat([out[..., :keys.start], parts[0] + zeros[0], parts[1] + zeros[1]], -1)
                zero = torch.zeros_like(out, requires_grad=fisher)
                captured.append((i, which, out, zero))
                return out + zero
            return grab

        handles = []
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            if hasattr(attn, "qkv_proj"):
                handles.append(attn.qkv_proj.register_forward_hook(hook(i, None)))
            else:
                handles.append(attn.k_proj.register_forward_hook(hook(i, 0)))
                handles.append(attn.v_proj.register_forward_hook(hook(i, 1)))
        try:
            with torch.enable_grad() if fisher else torch.no_grad():
                out = model(row[None], labels=row[None] if fisher else None, use_cache=False)
                g = torch.autograd.grad(out.loss, [c[3] for c in captured]) if fisher else [None] * len(captured)
        finally:
            for h in handles:
                h.remove()
        for (i, which, act, _), grad in zip(captured, g):
            acts[i][which].append(act.detach()[0].float())
            grads[i][which].append(torch.ones_like(act[0]).float() if grad is None else grad[0].float() ** 2)
    stack = lambda pair: tuple(torch.stack(p) for p in pair)  # noqa: E731
    return [stack(a) for a in acts], [stack(g) for g in grads]
