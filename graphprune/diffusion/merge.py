"""ToMe for Stable Diffusion's matching (Bolya & Hoffman 2023): bipartite soft matching with one destination token per
``sx × sy`` cell of the token grid, merge by mean, unmerge by copying each destination back to its sources.

Everything is plain tensor work with static shapes (the number of merged tokens is ``int(N · ratio)``), so a reduced
denoiser exports; the random cell choice is an input (``cells``), drawn outside the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from graphprune.ops.maps import add_rows, flat_rows, take_rows


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
    """One block call's matching: ``merge`` (B, N, C) → (B, N − r, C) and ``unmerge`` back, per sample.

    Every token gets one output slot (``slots``): an unmerged source its own, a destination and the sources merged into
    it the destination's. Merging adds each token's row into its slot and divides by the slot's count; unmerging reads
    each token's row back from its slot: one scatter-add and one gather per call, the slots worked out once per match
    (the op count matters on a GPU, where each small op costs a launch)."""

    def __init__(self, metric: torch.Tensor, grid: Grid, cells: torch.Tensor, r: int,
                 decided: tuple[torch.Tensor, torch.Tensor] | None = None):
        """``decided``: (order, choice) taken from another run of the same matching (an exported graph's), followed
        instead of this one's; ``slack`` then says how far they are from optimal under this run's scores, ``differs``
        whether this run would have merged other tokens."""
        b, n = metric.shape[:2]
        src, dst = split_indices(grid, cells)
        self.n, self.dst, self.r = n, dst, min(r, src.numel())
        with torch.no_grad():
            m = F.normalize(metric, dim=-1)
            scores = m[:, src] @ m[:, dst].transpose(1, 2)  # (B, sources, destinations)
            best, choice = scores.max(dim=-1)
            order = best.argsort(dim=-1, descending=True)  # sources, most similar first: the first r merge
            if decided is not None:
                self.slack = _slack(scores, best, *decided, self.r)
                self.differs = not torch.equal(_assignment(order, choice, self.r), _assignment(*decided, self.r))
                order, choice = decided
        self.order, self.choice = order, choice
        into = choice.gather(1, order[:, :self.r])  # their destinations (positions among the destinations)
        at = src[order]  # (B, sources) token positions: the merged ones, then those kept as they are
        self.kept_at = at[:, self.r:]
        kept = self.kept_at.shape[1]
        self.width = kept + dst.numel()  # tokens after merging
        # slot of every token: kept sources 0.., the merged ones their destination's, destinations kept.. in cell order
        tokens = torch.cat([at, dst.expand(b, -1)], dim=1)
        slots = torch.cat([into + kept, torch.arange(self.width, device=dst.device).expand(b, -1)], dim=1)
        self.slots = slots.new_empty(b, n).scatter_(1, tokens, slots)  # (B, N): the output slot of each token
        self.rows = flat_rows(self.slots, self.width)  # the slots as rows of a (B·width, C) view
        self.count = torch.zeros(b, self.width, 1, dtype=metric.dtype, device=metric.device).scatter_add_(
            1, self.slots.unsqueeze(-1), torch.ones_like(metric[..., :1]))

    def positions(self) -> torch.Tensor:
        """(B, N − r): the token position each merged token stands at (a destination at its own)."""
        return torch.cat([self.kept_at, self.dst.unsqueeze(0).expand(self.kept_at.shape[0], -1)], dim=1)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """Unmerged sources, then destinations, each the mean of itself and the sources merged into it (whole token
        rows added: see ``graphprune.ops.maps``)."""
        total = add_rows(x.new_zeros(x.shape[0], self.width, x.shape[2]), self.slots, x, flat=self.rows)
        return total / self.count.to(x.dtype)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """Back to N tokens in their places: each token takes its slot's value."""
        return take_rows(y, self.slots, flat=self.rows)
