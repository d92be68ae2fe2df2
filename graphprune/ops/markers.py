"""The token markers: pass-through ops used only during capture.

``graphprune::tokens(x)`` marks a block's token input. Its fake implementation returns a
fresh data-dependent token count, so every reshape inside the block that follows reads the
token count from the tensor (``sym_size``) instead of baking in a literal such as 197.

``graphprune::token_mask(mask, x, n)`` marks any other tensor a block takes that is indexed
by token (an attention mask of shape (B, 1, n, n) or (B, 1, 1, n)): its dimensions equal
to ``n`` take the token count of the marked ``x``, so mask and tokens share one symbol.
The markers are removed right after the rewrite.
"""

import torch


@torch.library.custom_op("graphprune::tokens", mutates_args=())
def tokens(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@tokens.register_fake
def _tokens_fake(x):
    n = torch.library.get_ctx().new_dynamic_size(min=2)  # >= 2: HF attention branches on "q_len > 1"
    return x.new_empty((x.shape[0], n, *x.shape[2:]))


@torch.library.custom_op("graphprune::token_mask", mutates_args=())
def token_mask(mask: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
    return mask.clone()


@token_mask.register_fake
def _token_mask_fake(mask, x, n):
    shape = [x.shape[1] if (i > 0 and d == n) else d for i, d in enumerate(mask.shape)]
    return mask.new_empty(shape)


MARKER = torch.ops.graphprune.tokens.default
MASK_MARKER = torch.ops.graphprune.token_mask.default
