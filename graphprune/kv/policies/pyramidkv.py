"""PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling (Cai et al., 2024).

Per-layer budgets as in the authors' code (``PyramidKVCluster``): with M the budget and w the window,
the bottom layer chooses up to 2(M − w) − (M − w)//beta prompt tokens, and each layer above it
(high − low) // L fewer (L the number of layers: the code's ``steps``, so the top layer stays a step
above (M − w)//beta and the mean lies a little above M), each plus the window. A prompt shorter
than 2(M − w) falls back to SnapKV's uniform M. kvpress's variant differs: its
budget counts the window inside the pyramid and its step is fractional, so its mean is exactly M.
The observation window (8), pooling kernel (7) and max pooling are the authors' settings (their LongBench driver
sets them for PyramidKV and SnapKV alike); ``snapkv`` keeps SnapKV's own (32, 5, average).
"""

from __future__ import annotations

from dataclasses import dataclass

from graphprune.kv.policies.snapkv import SnapKV
from graphprune.recipes.base import option, register


@register
@dataclass
class PyramidKV(SnapKV):
    name = "pyramidkv"
    summary = "SnapKV scoring with per-layer budgets falling linearly with depth (about the same mean budget)"
    paper = "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling (2024)"

    window: int = option(8, "observation window: the last prompt queries that score the earlier keys; always kept "
                            "(the authors' setting, as their kernel and pooling)")
    kernel: int = option(7, "1-D pooling kernel that smooths the votes")
    pooling: str = option("max", "pooling of the votes: avg or max")
    beta: int = option(20, "the pyramid's slope: the top layer chooses about (budget − window) // beta prompt tokens "
                           "besides the window")

    def capacity(self, layer, n_layers, prompt_len):
        budget = self.tokens(prompt_len)
        if prompt_len < 2 * (budget - self.window) or n_layers == 1:  # nothing to compress, or uniform SnapKV
            return budget
        spare = budget - self.window  # chosen tokens per layer on average (the window comes on top)
        low = spare // self.beta
        high = 2 * spare - low
        if high >= prompt_len - self.window:  # the bottom layer cannot keep more than the prompt
            high = prompt_len - self.window
            low = 2 * spare - high
        step = (high - low) // n_layers  # the authors' divisor: the number of layers
        return high - layer * step + self.window
