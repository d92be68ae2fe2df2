"""ToMe for Stable Diffusion's matching (Bolya & Hoffman 2023): bipartite soft matching with one destination token per
``sx × sy`` cell of the token grid, merge by mean, unmerge by copying each destination back to its sources.

Everything is plain tensor work with static shapes (the number of merged tokens is ``int(N · ratio)``), so a reduced
denoiser exports; the random cell choice is an input (``cells``), drawn outside the graph.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from graphprune.ops.maps import add_flat


@dataclass(frozen=True)
class Grid:
    """Where a block's tokens lie: ``h × w`` in raster order, and the cells that each give one destination."""

    h: int
    w: int
    sx: int
    sy: int

    @property
    def cells(self) -> tuple[int, int]:
        """(rows, columns) of cells; the rows and columns left over past whole cells are always sources."""
        return self.h // self.sy, self.w // self.sx


def draw_cells(grid: Grid, generator: torch.Generator | None) -> torch.Tensor:
    """The destination's slot in each cell, in ``[0, sx·sy)``, as the published code draws it (one ``randint`` over
    the cells from ``generator``); ``None``: every cell's top-left token (the published ``use_rand=False``)."""
    rows, cols = grid.cells
    if generator is None:
        return torch.zeros(rows, cols, dtype=torch.long)
    return torch.randint(grid.sx * grid.sy, size=(rows, cols, 1), generator=generator,
                         device=generator.device).reshape(rows, cols)


def _assignment(order: torch.Tensor, choice: torch.Tensor, r: int) -> torch.Tensor:
    """(B, sources): each source's destination if it is merged, else -1 (a matching as a set, its order aside)."""
    return torch.full_like(choice, -1).scatter(1, order[:, :r], choice.gather(1, order[:, :r]))


def _slack(scores: torch.Tensor, best: torch.Tensor, order: torch.Tensor, choice: torch.Tensor, r: int) -> float:
    """How far a given matching is from optimal under ``scores``: the largest amount by which a chosen destination
    falls short of the source's best one, or a merged source's similarity of one kept (0: optimal; small: a near-tie
    decided the other way)."""
    chosen = scores.gather(-1, choice.unsqueeze(-1)).squeeze(-1)  # (B, sources)
    short = (best - chosen).max()
    ranked = chosen.gather(1, order)
    if 0 < r < ranked.shape[1]:
        short = torch.maximum(short, ranked[:, r:].max(dim=1).values.sub(ranked[:, :r].min(dim=1).values).max())
    return float(short.clamp_min(0))


@dataclass(frozen=True)
class _Layout:
    """What a matching on ``grid`` needs that the cells do not change, worked out once per grid, batch, ``r`` and
    device (each op left out of a block call is a kernel launch fewer on a GPU)."""

    table: torch.Tensor  # (S, S, rows, cols): the token at rank j of each cell when its slot k is the destination
    rest: torch.Tensor | None  # the tokens past whole cells (always sources)
    lift: torch.Tensor  # (B, 1): added to a merged source's destination number to give its row in the merged view
    fixed: torch.Tensor  # (B, width): rows of the kept sources (in their order) and of the destinations
    ones: torch.Tensor  # (B·N,): one per token, counted into its row


def _build_layout(grid: Grid, b: int, r: int, device: torch.device, dtype: torch.dtype) -> _Layout:
    """Slot k of a cell is its token at (k // sx, k % sx); rank 0 of a cell is the destination, the other slots follow
    in raster order. Sources are ordered by rank, then cell, then the tokens past whole cells."""
    rows, cols = grid.cells
    s, n = grid.sx * grid.sy, grid.h * grid.w
    kept = n - rows * cols - r
    k = torch.arange(s, device=device)
    rank = k[:, None]
    slot = torch.where(rank == 0, k, rank - 1 + (rank - 1 >= k).long())  # (rank, chosen slot) → slot
    offset = (slot // grid.sx) * grid.w + slot % grid.sx
    token = torch.arange(n, device=device).view(grid.h, grid.w)
    corner = token[: rows * grid.sy: grid.sy, : cols * grid.sx: grid.sx]  # each cell's top-left token
    table = corner + offset[:, :, None, None]
    past = [token[:, cols * grid.sx:].reshape(-1), token[rows * grid.sy:, : cols * grid.sx].reshape(-1)]
    rest = torch.cat(past) if past[0].numel() + past[1].numel() else None
    start = torch.arange(b, device=device)[:, None] * (n - r)
    return _Layout(table, rest, start + kept, start + torch.arange(n - r, device=device),
                   torch.ones(b * n, device=device, dtype=dtype))


@functools.lru_cache(maxsize=64)
def _kept_layout(grid: Grid, b: int, r: int, device: torch.device, dtype: torch.dtype) -> _Layout:
    with torch.inference_mode(False), torch.no_grad():  # tensors usable in and out of inference mode
        return _build_layout(grid, b, r, device, dtype)


def _layout(grid: Grid, b: int, r: int, device: torch.device, dtype: torch.dtype, cells: torch.Tensor) -> _Layout:
    """The grid's layout: kept between calls for real tensors; built anew while tracing (an export, torch.compile),
    where the tensors would belong to the trace."""
    if type(cells) is not torch.Tensor or torch.compiler.is_compiling():
        return _build_layout(grid, b, r, device, dtype)
    return _kept_layout(grid, b, r, device, dtype)


class Merge:
    """One block call's matching: ``merge`` (B, N, C) → (B, N − r, C) and ``unmerge`` back, per sample.

    Every token gets one output row (``rows``, in a (B·(N − r), C) view): an unmerged source its own, a destination and
    the sources merged into it the destination's. Merging adds each token's row into its own and divides by the row's
    count; unmerging reads each token's row back: one row addition and one row gather per op, the rows worked out
    once per match, the grid's constants once per grid. The op count matters on a GPU, where each small op costs a
    launch (``benchmarks/diffusion_ops.py`` counts them)."""

    def __init__(self, metric: torch.Tensor, grid: Grid, cells: torch.Tensor, r: int,
                 decided: tuple[torch.Tensor, torch.Tensor] | None = None):
        """``decided``: (order, choice) taken from another run of the same matching (an exported graph's), followed
        instead of this one's; ``slack`` then says how far they are from optimal under this run's scores, ``differs``
        whether this run would have merged other tokens."""
        b, n = metric.shape[:2]
        rows, cols = grid.cells
        d = rows * cols
        self.n, self.r = n, min(r, n - d)
        self.width = n - self.r  # tokens after merging
        lay = _layout(grid, b, self.r, metric.device, metric.dtype, cells)
        s = lay.table.shape[0]
        picked = lay.table.gather(1, cells.long().view(1, 1, rows, cols).expand(s, 1, rows, cols)).view(-1)
        split = picked if lay.rest is None else torch.cat([picked, lay.rest])  # destinations, then the sources
        self.dst, src = split[:d], split[d:]
        with torch.no_grad():
            m = F.normalize(metric.index_select(1, split), dim=-1)
            scores = m[:, d:] @ m[:, :d].transpose(1, 2)  # (B, sources, destinations)
            best, choice = scores.max(dim=-1)
            order = best.argsort(dim=-1, descending=True)  # sources, most similar first: the first r merge
            if decided is not None:
                self.slack = _slack(scores, best, *decided, self.r)
                self.differs = not torch.equal(_assignment(order, choice, self.r), _assignment(*decided, self.r))
                order, choice = decided
        self.order, self.choice = order, choice
        self.at = src.take(order)  # (B, sources) token positions: the merged ones, then those kept as they are
        into = choice.gather(1, order[:, :self.r]) + lay.lift  # the merged sources' rows: their destinations'
        tokens = torch.cat([self.at, self.dst.expand(b, -1)], dim=1)
        rows = metric.new_empty(b, n, dtype=torch.long).scatter_(1, tokens, torch.cat([into, lay.fixed], dim=1))
        self.rows = rows.view(-1)  # (B·N,): the row of each token
        self.count = add_flat(metric.new_zeros(b * self.width), self.rows, lay.ones).view(b, self.width, 1)

    def positions(self) -> torch.Tensor:
        """(B, N − r): the token position each merged token stands at (a destination at its own)."""
        return torch.cat([self.at[:, self.r:], self.dst.expand(self.at.shape[0], -1)], dim=1)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """Unmerged sources, then destinations, each the mean of itself and the sources merged into it (whole token
        rows added: see ``graphprune.ops.maps``)."""
        b, _, c = x.shape
        total = add_flat(x.new_zeros(b * self.width, c), self.rows, x.reshape(-1, c)).view(b, self.width, c)
        return total / self.count.to(x.dtype)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """Back to N tokens in their places: each token takes its row's value."""
        b, _, c = y.shape
        return y.reshape(-1, c).index_select(0, self.rows).view(b, self.n, c)
