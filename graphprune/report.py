"""What ``optimize`` reports: tokens per block, FLOPs before and after, parity."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.utils._pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

from graphprune.ops.evit import evit_keep_count
from graphprune.ops.pitome import pitome_r
from graphprune.ops.tome import tome_effective_r

aten = torch.ops.aten


def _sdpa_flops(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    *batch, nq, d = q_shape
    nk, dv = k_shape[-2], v_shape[-1]
    return math.prod(batch) * (2 * nq * nk * d + 2 * nq * nk * dv)


# The token ops' own cost, which FlopCounterMode cannot see inside a custom op (what is counted: count_flops).


def _cosine(rows: int, cols: int, d: int, normalised: int) -> int:
    """Similarity of ``rows`` × ``cols`` tokens after L2-normalising ``normalised`` tokens (d channels)."""
    return 2 * rows * cols * d + 2 * normalised * d


def _tome_flops(x_shape, size_shape, metric_shape, r, protected, *args, **kwargs) -> int:
    b, n, c = x_shape
    if tome_effective_r(n, r, protected) == 0:
        return 0
    d = metric_shape[-1]
    return b * (_cosine((n + 1) // 2, n // 2, d, n) + 2 * n * c)  # A·Bᵀ similarity, size-weighted merge


def _merge_nearest_flops(x_shape, size_shape, metric_shape, score_shape, keep, protected, *args, **kwargs) -> int:
    b, n, c = x_shape
    if keep >= n - protected:
        return 0
    rest = n - protected - keep
    return b * (_cosine(rest, keep, metric_shape[-1], n) + 2 * n * c)  # each pruned token to every kept one, merge


def _pitome_flops(x_shape, size_shape, metric_shape, r, protected, margin, all_pairs, *args, **kwargs) -> int:
    b, n, c = x_shape
    r = pitome_r(n, r, protected, all_pairs)
    if r == 0:
        return 0
    t, d = n - protected, metric_shape[-1]
    energy = _cosine(t, t, d, t)  # every token to every token
    pairs = _cosine((t + 1) // 2, t // 2, d, 0) if all_pairs else _cosine(r, r, d, 0)  # A·Bᵀ over the pool
    return b * (energy + pairs + 2 * n * c)


def _evit_flops(x_shape, score_shape, keep, protected, *args, **kwargs) -> int:
    b, n, c = x_shape
    if evit_keep_count(n, keep, protected) >= n - protected:
        return 0
    return b * 2 * (n - protected) * c  # the fused token: a score-weighted sum over the unprotected tokens


def _scatter_add_flops(self_shape, dim, index_shape, src_shape, *args, **kwargs) -> int:
    return 2 * math.prod(src_shape)  # a weighted sum into slots (merge_by_assign): one multiply-add per source element


# FlopCounterMode has no formula for the CPU flash-attention kernel, and cannot see inside
# custom ops. Its registry is keyed by overload packet. (Its GPU kernels' formulas take grouped-query attention, fewer
# key/value heads than query heads, only from torch 2.12 on: counted here alike.)
_CUSTOM = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
    aten._scaled_dot_product_flash_attention: _sdpa_flops,
    aten._scaled_dot_product_efficient_attention: _sdpa_flops,
    aten._scaled_dot_product_cudnn_attention: _sdpa_flops,
    aten.scatter_add: _scatter_add_flops,
    torch.ops.graphprune.tome_merge: _tome_flops,
    torch.ops.graphprune.merge_nearest: _merge_nearest_flops,
    torch.ops.graphprune.pitome_merge: _pitome_flops,
    torch.ops.graphprune.evit_select: _evit_flops,
}


def max_abs_diff(a, b) -> float:
    """Largest absolute difference over matching tensors of two (nested) outputs."""
    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(la, lb))


def count_flops(module, inputs: tuple) -> int:
    """FLOPs of one forward pass, 2 per multiply-add: the matrix products (linear layers, convolutions,
    attention) and the token reductions' own cost.

    The reductions' cost, per sample (N tokens in, C channels, a d-channel similarity metric):

    * similarity: a cosine-similarity matrix between ``rows`` and ``cols`` tokens costs
      2·rows·cols·d, and the metric's L2 normalisation 2·n·d for the n tokens normalised;
    * weighted sums of tokens (merges, EViT's fused token): 2·n·C, one multiply-add per input
      token and channel summed (a product with the sparse merge matrix).

    Per custom op (``graphprune/ops``): ``tome_merge``: the A·Bᵀ similarity (⌈N/2⌉ × ⌊N/2⌋) and the
    merge; ``merge_nearest`` (TPS, DiffRate): pruned × kept similarity and the merge;
    ``pitome_merge``: the T × T energy similarity (T unprotected tokens), the A·Bᵀ similarity over
    the mergeable pool and the merge; ``evit_select``: the fused token (2·(N − protected)·C);
    ``prune``: nothing (it only selects); the markers ``tokens``/``token_mask`` are removed before
    counting. An op that reduces nothing (r = 0, keep covering every token) costs nothing. The
    token ops written as plain tensor code (ToMe's random/k-th splits, ATS, ATC's clustering,
    Zero-TPrune's PageRank and similarity) are traced into the graph, where their matrix products
    are counted like any other, and their merges (``aten.scatter_add`` of ``ops.maps.merge_by_assign``)
    as weighted sums.

    Not counted, as elsewhere in the model: sorting, top-k, argmin/argmax (ATC's clustering loop is
    mostly these), gathers and scatters that only move data, masking, and elementwise work (such as
    the softmax of attention, or the ELU of PiToMe's energy).
    """
    counter = flop_counter()
    with counter, torch.no_grad():
        module(*inputs)
    return int(counter.get_total_flops())


def flop_counter() -> FlopCounterMode:
    """A FlopCounterMode that counts graphprune's token ops as :func:`count_flops` does (a benchmark's whole model)."""
    return FlopCounterMode(display=False, custom_mapping=_CUSTOM)


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
    engine: str | None = None  # target="trt": the TensorRT engine built here (None: not built, see engine_note)
    engine_note: str | None = None

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
