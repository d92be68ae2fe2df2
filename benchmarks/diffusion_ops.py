"""What one reduced transformer block adds to a denoiser call, graphprune's ToMe for SD against the official ``tomesd``
package (needs ``pip install tomesd``), on a tiny 4-block DiT at ratio 0.5:

- the ops: every op the call dispatches, counted with a dispatch-mode hook, minus the unmodified model's. On a
  launch-bound GPU each op that runs a kernel costs a launch;
- the host time: the call's time minus the unmodified model's, per reduced block, on one CPU thread (medians of
  interleaved rounds, each round's difference). With tiny tensors the time is Python and dispatch, the work that issues the kernels: on a GPU
  whose step is launch-bound (a guidance batch of 2, tomesd #6 and #19) that is the step's time.

    python benchmarks/diffusion_ops.py [--rounds 15]

Printed, not written: docs/diffusion.md quotes one run's numbers with this command.
"""

from __future__ import annotations

import argparse
import collections
import copy
import statistics
import time

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

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds")
    parser.add_argument("--calls", type=int, default=50, help="calls per variant and round")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(1)
    model = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                            num_layers=BLOCKS, sample_size=16, patch_size=2, num_embeds_ada_norm=10,
                                            norm_num_groups=4).eval()
    x, kw = torch.randn(2, 4, 16, 16), {"timestep": torch.full((2,), 3), "class_labels": torch.arange(2)}
    official = copy.deepcopy(model)
    tomesd.apply_patch(official, ratio=0.5, max_downsample=2)  # (it counts DiT's patch grid as one downsampling)
    variants = {"unmodified": model, "graphprune": graphprune.optimize(model, "tomesd", ratio=0.5, seed=0),
                "official tomesd": official}
    counts, times = {}, {name: [] for name in variants}
    with torch.no_grad():
        for name, f in variants.items():
            f(x, **kw)  # (the official hook reads the latent from the first positional argument)
            count = _Count()
            with count:
                f(x, **kw)
            counts[name] = count.ops
        for _ in range(args.rounds):
            for name, f in variants.items():
                start = time.perf_counter()
                for _ in range(args.calls):
                    f(x, **kw)
                times[name].append((time.perf_counter() - start) / args.calls)
    base = statistics.median(times["unmodified"])
    for name in ("graphprune", "official tomesd"):
        added = counts[name].copy()
        added.subtract(counts["unmodified"])
        total = sum(added.values()) / BLOCKS
        kernels = sum(v for op, v in added.items() if op not in VIEWS) / BLOCKS
        host = statistics.median(t - u for t, u in zip(times[name], times["unmodified"])) / BLOCKS * 1e6  # (paired
        # within each round: the machine's drift between rounds cancels)
        print(f"{name}: {total:.0f} dispatched ops per reduced block, {kernels:.0f} of them run a kernel; "
              f"{host:.0f} µs of host time added per reduced block")
    print(f"(the unmodified call: {base * 1e6:.0f} µs, {BLOCKS} blocks; medians of {args.rounds} interleaved rounds "
          f"of {args.calls} calls, torch {torch.__version__}, one thread)")


if __name__ == "__main__":
    main()
