"""The token marker: a pass-through op used only during capture.

Its fake implementation returns a fresh data-dependent token count, so every reshape
inside the block that follows reads the token count from the tensor (``sym_size``)
instead of baking in a literal such as 197. The markers are removed right after capture.
"""

import torch


@torch.library.custom_op("graphprune::tokens", mutates_args=())
def tokens(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@tokens.register_fake
def _tokens_fake(x):
    n = torch.library.get_ctx().new_dynamic_size(min=1)
    return x.new_empty((x.shape[0], n, *x.shape[2:]))


MARKER = torch.ops.graphprune.tokens.default
