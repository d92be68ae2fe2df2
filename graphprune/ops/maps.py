"""Token maps: every reduction op also says where the tokens went.

``assign`` (B, N_in): the output index each input token ends up in (merged and fused tokens
point at the token that absorbed them). ``rep`` (B, N_out): for each output token, one input
token it stands for. Composed across blocks they restore per-token outputs to the original
positions and make attention masks follow the tokens.
"""

from __future__ import annotations

import torch


def identity_maps(x: torch.Tensor):
    idx = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], x.shape[1]).clone()
    return idx, idx.clone()
