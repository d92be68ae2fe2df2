"""What ``optimize`` reports: tokens per block, FLOPs before and after, parity."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch
import torch.utils._pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


def _sdpa_flops(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    *batch, nq, d = q_shape
    nk, dv = k_shape[-2], v_shape[-1]
    b = 1
    for s in batch:
        b *= s
    return 2 * b * nq * nk * d + 2 * b * nq * nk * dv


def _tome_flops(x_shape, size_shape, metric_shape, r, protected, *args, **kwargs) -> int:
    b, n, d = metric_shape
    return 2 * b * ((n + 1) // 2) * (n // 2) * d  # the A·Bᵀ similarity


# FlopCounterMode has no formula for the CPU flash-attention kernel, and cannot see inside
# custom ops. Its registry is keyed by overload packet.
_CUSTOM = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
    torch.ops.graphprune.tome_merge: _tome_flops,
}


def max_abs_diff(a, b) -> float:
    """Largest absolute difference over matching tensors of two (nested) outputs."""
    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(la, lb))


def count_flops(module, inputs: tuple) -> int:
    """FLOPs (2 per multiply-add) of one forward pass, attention included."""
    counter = FlopCounterMode(display=False, custom_mapping=_CUSTOM)
    with counter, torch.no_grad():
        module(*inputs)
    return int(counter.get_total_flops())


@dataclass
class Report:
    recipe: str
    options: dict
    tokens_per_block: list[int]
    flops_before: int
    flops_after: int
    parity: dict = field(default_factory=dict)  # name -> max abs diff
    layout: dict = field(default_factory=dict)
    artifact: str | None = None

    @property
    def flop_ratio(self) -> float:
        return self.flops_after / self.flops_before if self.flops_before else float("nan")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["flop_ratio"] = self.flop_ratio
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def table(self):
        from rich.table import Table

        t = Table(title=f"graphprune · {self.recipe} {self.options}")
        t.add_column("block", justify="right")
        t.add_column("tokens in", justify="right")
        for i, n in enumerate(self.tokens_per_block):
            t.add_row(str(i), str(n))
        t.add_section()
        t.add_row("GFLOPs", f"{self.flops_before / 1e9:.3f} → {self.flops_after / 1e9:.3f} ({self.flop_ratio:.3f}×)")
        for name, diff in self.parity.items():
            t.add_row(f"parity {name}", f"max |Δ| = {diff:.2e}")
        if self.artifact:
            t.add_row("artifact", self.artifact)
        return t
