"""ToMe for Stable Diffusion's matching (Bolya & Hoffman 2023): bipartite soft matching with one destination token per
``sx × sy`` cell of the token grid, merge by mean, unmerge by copying each destination back to its sources.

Everything is plain tensor work with static shapes (the number of merged tokens is ``int(N · ratio)``), so a reduced
denoiser exports; the random cell choice is an input (``cells``), drawn outside the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from graphprune.ops.maps import add_rows, place_rows, take_rows


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


def split_indices(grid: Grid, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token indices of the sources (raster order) and of the destinations (cell order) for the cell choice."""
    rows, cols = grid.cells
    device = cells.device
    cells = cells.long()
    r = torch.arange(rows, device=device).unsqueeze(1) * grid.sy + torch.div(cells, grid.sx, rounding_mode="floor")
    c = torch.arange(cols, device=device).unsqueeze(0) * grid.sx + cells % grid.sx
    dst = (r * grid.w + c).reshape(-1)
    n = grid.h * grid.w
    key = torch.arange(n, device=device).index_fill(0, dst, n)  # destinations last, the sources in raster order first
    src = torch.argsort(key)[: n - rows * cols]
    return src, dst


class Merge:
    """One block call's matching: ``merge`` (B, N, C) → (B, N − r, C) and ``unmerge`` back, per sample."""

    def __init__(self, metric: torch.Tensor, grid: Grid, cells: torch.Tensor, r: int):
        n = metric.shape[1]
        self.n, self.src, self.dst = n, *split_indices(grid, cells)
        self.r = min(r, self.src.numel())
        with torch.no_grad():
            m = F.normalize(metric, dim=-1)
            scores = m[:, self.src] @ m[:, self.dst].transpose(1, 2)  # (B, sources, destinations)
            best, choice = scores.max(dim=-1)
            order = best.argsort(dim=-1, descending=True)
        self.unmerged = order[:, self.r:]  # sources kept as they are (positions among the sources)
        self.merged = order[:, :self.r]  # sources averaged into their most similar destination
        self.into = choice.gather(1, self.merged)  # that destination (position among the destinations)
        self.kept_at, self.moved_at = self.src[self.unmerged], self.src[self.merged]  # (B, ·) token positions

    def positions(self) -> torch.Tensor:
        """(B, N − r): the token position each merged token stands at (a destination at its own)."""
        return torch.cat([self.kept_at, self.dst.unsqueeze(0).expand(self.kept_at.shape[0], -1)], dim=1)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """Unmerged sources, then destinations, each the mean of itself and the sources merged into it (whole token
        rows copied and added: see ``graphprune.ops.maps``)."""
        dst = x[:, self.dst]
        total = add_rows(dst, self.into, take_rows(x, self.moved_at))
        count = add_rows(torch.ones_like(dst[..., :1]), self.into, torch.ones_like(self.into[..., None], dtype=x.dtype))
        return torch.cat([take_rows(x, self.kept_at), total / count], dim=1)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """Back to N tokens in their places: each merged source takes its destination's value."""
        u = self.unmerged.shape[1]
        dst = y[:, u:]
        rows = torch.cat([y[:, :u], take_rows(dst, self.into), dst], dim=1)
        index = torch.cat([self.kept_at, self.moved_at, self.dst.unsqueeze(0).expand(y.shape[0], -1)], dim=1)
        return place_rows(rows, index, self.n)
