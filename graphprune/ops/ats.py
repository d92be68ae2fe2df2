"""ATS inverse-transform token sampling (Fayyaz et al., ECCV 2022), with a fixed capacity.

``ats_sample(x, score, samples, protected)`` follows the official ``AdaptiveTokenSampler``:

* the significance ``score`` (B, n) of the unprotected tokens is normalised to sum to 1 and
  sorted ascending; its cumulative sum is min-max normalised to a CDF running from 0 to 1, the
  minimum being the cumulative sum at the least significant *real* token (its own score);
* ``samples`` points are spaced evenly from the smallest positive CDF value to 1 (no random
  draw at inference), and each picks the token whose CDF value is nearest (ties: the lower);
* repeated picks count once, so the number of distinct tokens varies per sample.

The kept tokens come out after the protected prefix in ascending significance, as in the
official code. The output has a fixed capacity of ``protected + min(samples, n - protected)``
slots; the slots past a sample's own count are padding, returned with size 0 (their values
are copies of a kept token). Callers mask them out of attention with ``log(size)``, which
is what the official masked softmax does (up to its 1e-6 epsilon), and sized pooling skips
them. Plain tensor code with static shapes: it exports to ONNX without a custom lowering.

Padding from an earlier sampling block (``size`` 0) takes no part in the sampling: its score is
zero, so it sorts first, and the CDF minimum is taken over the real tokens only. Each image then
samples exactly as the official code with ``DROP_TOKENS`` does for one image at a time, where
the dropped tokens are gone. (The official masked mode keeps them in the CDF with score 0, which
pins its minimum at 0 and shifts the sample points from the second sampling block on.)
"""

from __future__ import annotations

import torch

from graphprune.ops.maps import prefix_index


def ats_capacity(n: int, samples: int, protected: int) -> int:
    return protected + min(samples, n - protected)


def ats_sample(x, score, samples: int, protected: int, n: int, size=None):
    """Returns (x, assign, rep, size): ``n`` is the static token count of ``x``; ``size`` (B, n, 1), when
    given, marks the padding of an earlier sampling (size 0), which is left out of the CDF."""
    p = n - protected
    slots = min(samples, p)
    long = torch.long
    s = score[:, protected:]
    real = None if size is None else size[:, protected:, 0] > 0
    if real is not None:
        s = torch.where(real, s, torch.zeros_like(s))
    s = s / s.sum(dim=1, keepdim=True).clamp(min=1e-30)
    ranked, order = s.sort(dim=1, stable=True)  # ascending significance; padding (score 0) first
    cdf = ranked.cumsum(dim=1)
    high = cdf[:, -1:]
    if real is None:
        low = cdf[:, :1]
    else:  # the CDF value of the least significant real token; padding sits at or below it
        low = torch.where(real.gather(1, order), cdf, high).amin(dim=1, keepdim=True)
    cdf = (cdf - low) / (high - low).clamp(min=1e-30)  # padding: <= 0, never a start point nor nearest
    y0 = torch.where(cdf > 0, cdf, torch.ones_like(cdf)).amin(dim=1, keepdim=True)
    steps = x.new_tensor([i / max(samples - 1, 1) for i in range(samples)])
    ys = y0 + steps * (1 - y0)  # (B, samples)
    picks = (ys[:, :, None] - cdf[:, None, :]).abs().argmin(dim=2)  # nearest CDF value; ties: the lower index
    picks = picks.sort(dim=1, stable=True)[0]
    repeated = torch.cat([picks[:, :-1] == picks[:, 1:], torch.zeros_like(picks[:, :1], dtype=torch.bool)], dim=1)
    unique = torch.where(repeated, torch.full_like(picks, p), picks).sort(dim=1, stable=True)[0][:, :slots]
    valid = unique < p  # (B, slots): distinct picks first (ascending significance), then padding
    token = order.gather(1, unique.clamp(max=p - 1)) + protected
    head = prefix_index(x, protected)
    rep = torch.cat([head, token], dim=1)
    slot = torch.ones_like(rep).cumsum(1) - 1
    # padding slots scatter into a spare column, so each kept token's slot is written once
    spare = torch.full_like(rep, n)
    target = torch.cat([head, torch.where(valid, token, spare[:, protected:])], dim=1)
    assign = torch.full_like(torch.cat([x[..., 0], x[:, :1, 0]], dim=1), -1, dtype=long).scatter(1, target, slot)[:, :n]
    size = torch.cat([torch.ones_like(x[:, :protected, :1]), valid[..., None].to(x.dtype)], dim=1)
    out = x.gather(1, rep[..., None].expand(-1, -1, x.shape[-1]))
    return out, assign, rep, size
