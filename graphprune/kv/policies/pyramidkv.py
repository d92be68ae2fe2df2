"""PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling (Cai et al., 2024)."""

from __future__ import annotations

from dataclasses import dataclass

from graphprune.kv.policies.snapkv import SnapKV
from graphprune.recipes.base import option, register


@register
@dataclass
class PyramidKV(SnapKV):
    name = "pyramidkv"
    summary = "SnapKV scoring with per-layer budgets falling linearly with depth (same mean budget)"
    paper = "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling (2024)"

    beta: int = option(20, "the top layer keeps (budget − window) / beta prompt tokens besides the window")

    def capacity(self, layer, n_layers, prompt_len):
        budget = self.tokens(prompt_len)
        if prompt_len <= budget or n_layers == 1:
            return budget
        spare = budget - self.window  # chosen tokens per layer on average (the window comes on top)
        low = spare // self.beta
        high = 2 * spare - low
        if high >= prompt_len - self.window:  # the bottom layer cannot keep more than the prompt
            high = prompt_len - self.window
            low = 2 * spare - high
        step = (high - low) // (n_layers - 1)
        return high - layer * step + self.window
