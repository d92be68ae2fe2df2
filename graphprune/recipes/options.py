"""The recipes' option parsers: per-block schedules, keep fractions, locations, token counts.

Each turns a user's option into the per-block values a recipe applies, raising ScheduleError
for a value of the wrong form. Shared by the recipes.
"""

from __future__ import annotations

from typing import Sequence, Union

from graphprune.errors import ScheduleError

RSchedule = Union[int, tuple, Sequence[int]]


def parse_r(r: RSchedule, num_blocks: int) -> list[int]:
    """ToMe's schedule: an int for every block, an (r, inflection) ramp, or one r per block.

    The ramp goes linearly from ``int(r * (1 - inflection))`` to ``2r`` minus that, so its
    mean is r; a shorter list is padded with zeros.
    """
    if isinstance(r, bool):
        raise ScheduleError(f"r must be an integer, a list of integers or (r, inflection), not {r!r}")
    if isinstance(r, (list,)) or (isinstance(r, tuple) and len(r) != 2):
        values = list(r)
        if len(values) > num_blocks:
            raise ScheduleError(f"r has {len(values)} per-block values but the model has {num_blocks} blocks")
        for v in values:
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ScheduleError(f"per-block r values must be non-negative integers, got {v!r}")
        return values + [0] * (num_blocks - len(values))
    inflect = 0.0
    if isinstance(r, tuple):
        r, inflect = r
        if not isinstance(inflect, (int, float)) or not -1.0 <= inflect <= 1.0:
            raise ScheduleError(f"the ramp's inflection must lie in [-1, 1], got {inflect!r}")
    if not isinstance(r, int) or isinstance(r, bool):
        raise ScheduleError(f"r must be an integer, got {r!r}")
    if r < 0:
        raise ScheduleError(f"r must be >= 0 (tokens merged per block), got {r}")
    lo = int(r * (1.0 - inflect))
    hi = 2 * r - lo
    step = (hi - lo) / max(num_blocks - 1, 1)
    return [int(lo + step * i) for i in range(num_blocks)]


def parse_keep(keep: float) -> float:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
        raise ScheduleError(f"keep must be a fraction in (0, 1], got {keep!r}")
    return float(keep)


def parse_locations(locations: Sequence[int] | None, num_blocks: int) -> list[int]:
    """Block indices (negative counts from the end); default ⌊L/4⌋, ⌊L/2⌋, ⌊3L/4⌋ as in EViT."""
    if locations is None:
        return sorted({num_blocks // 4, num_blocks // 2, 3 * num_blocks // 4})
    out = []
    for loc in locations:
        if not isinstance(loc, int) or isinstance(loc, bool) or not -num_blocks <= loc < num_blocks:
            raise ScheduleError(f"location {loc!r} is not a block index of this {num_blocks}-block model")
        out.append(loc % num_blocks)
    if len(set(out)) != len(out):
        raise ScheduleError(f"locations repeat a block: {list(locations)}")
    return sorted(out)


def parse_counts(counts: Sequence, num_blocks: int, tokens: int, protected: int, what: str) -> list[int]:
    """Tokens left after each block (protected included): ints, or floats as fractions of the initial count.

    A list shorter or longer than the model is resampled by block position (so a 12-block
    schedule applies to a 24-block model). Counts never go up and never below protected + 1.
    """
    values = list(counts)
    if not values:
        raise ScheduleError(f"{what} is empty")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise ScheduleError(f"{what} holds token counts (ints) or fractions of the tokens (floats in (0, 1]), got {v!r}")
    if len(values) != num_blocks:
        values = [values[round(i * (len(values) - 1) / max(num_blocks - 1, 1))] for i in range(num_blocks)]
    out, prev = [], tokens
    for v in values:
        n = round(v * tokens) if isinstance(v, float) else int(v)
        n = min(max(n, protected + 1), prev)
        out.append(n)
        prev = n
    return out


def location_keep_counts(patches: int, keep: float, locations: int) -> list[int]:
    """Tokens kept at each of ``locations`` locations out of ``patches``: ``int(P · keep^(k+1))`` (at least 1).

    TPS's kept tokens and ATC's clusters at the k-th location.
    """
    return [max(1, int(patches * keep ** (k + 1))) for k in range(locations)]
