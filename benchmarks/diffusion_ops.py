"""Ops one reduced transformer block adds to a denoiser call, graphprune's ToMe for SD against the official ``tomesd``
package (needs ``pip install tomesd``): a tiny 4-block DiT, ratio 0.5, every op the call dispatches counted with a
dispatch-mode hook, minus the unmodified model's. On a launch-bound GPU each op that runs a kernel costs a launch.

    python benchmarks/diffusion_ops.py

Printed, not written: docs/diffusion.md quotes one run's numbers with this command.
"""

from __future__ import annotations

import collections
import copy

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import graphprune

VIEWS = {"aten.view.default", "aten.expand.default", "aten.unsqueeze.default", "aten.slice.Tensor", "aten.alias.default",
         "aten._unsafe_view.default", "aten.transpose.int", "aten.new_empty.default", "aten.select.int", "aten.t.default",
         "aten.reshape.default", "aten.permute.default", "aten.squeeze.dim"}  # no kernel of their own
BLOCKS = 4


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    import diffusers
    import tomesd

    torch.manual_seed(1)
    model = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                            num_layers=BLOCKS, sample_size=16, patch_size=2, num_embeds_ada_norm=10,
                                            norm_num_groups=4).eval()
    x, kw = torch.randn(2, 4, 16, 16), {"timestep": torch.full((2,), 3), "class_labels": torch.arange(2)}
    official = copy.deepcopy(model)
    tomesd.apply_patch(official, ratio=0.5, max_downsample=2)  # (it counts DiT's patch grid as one downsampling)
    counts = {}
    for name, f in (("unmodified", model), ("graphprune", graphprune.optimize(model, "tomesd", ratio=0.5, seed=0)),
                    ("official tomesd", official)):
        with torch.no_grad():
            f(x, **kw)  # (the official hook reads the latent from the first positional argument)
            count = _Count()
            with count:
                f(x, **kw)
        counts[name] = count.ops
    for name in ("graphprune", "official tomesd"):
        added = counts[name].copy()
        added.subtract(counts["unmodified"])
        total = sum(added.values()) / BLOCKS
        kernels = sum(v for op, v in added.items() if op not in VIEWS) / BLOCKS
        print(f"{name}: {total:.0f} dispatched ops per reduced block, {kernels:.0f} of them run a kernel")


if __name__ == "__main__":
    main()
