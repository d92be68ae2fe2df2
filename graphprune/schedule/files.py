"""Saved schedules: a recipe with its per-block options, as chosen by ``graphprune.tune``.

A schedule file is JSON::

    {"format": "graphprune-schedule", "version": 1, "recipe": "tome", "options": {"r": [..]},
     "model": "...", "target": "eager", "batch": 8, "predicted_ms": .., "measured_ms": .., ...}

Only ``recipe`` and ``options`` decide what ``optimize`` does; the rest records where the
schedule came from. Pass it back as ``optimize(model, schedule="schedule.json")`` or
``graphprune-cli export/bench --schedule schedule.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from graphprune.errors import ScheduleError
from graphprune.exporters.files import write_text

FORMAT = "graphprune-schedule"
VERSION = 1


@dataclass
class Schedule:
    recipe: str
    options: dict
    info: dict = field(default_factory=dict)  # model, target, batch, predicted / measured latency, fidelity…

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "recipe": self.recipe, "options": self.options, **self.info}

    def save(self, path) -> Path:
        """Write the schedule as JSON (atomically: a failed write leaves no file)."""
        return write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")


def load_schedule(source: Union[str, Path, dict, Schedule]) -> Schedule:
    """A :class:`Schedule` from a file path, a dict in the file's format, or a Schedule."""
    if isinstance(source, Schedule):
        return source
    where = "the schedule"
    if isinstance(source, (str, Path)):
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise ScheduleError(f"no such schedule file: {path}")
        try:
            source = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ScheduleError(f"{path} is not a schedule file (not valid JSON: {err}); write one with "
                                "'graphprune-cli tune … -o FILE' or graphprune.tune(...).save(FILE)") from None
    if not isinstance(source, dict) or source.get("format") != FORMAT:
        raise ScheduleError(f"{where} is not a graphprune schedule (expected a JSON object with \"format\": \"{FORMAT}\")")
    if source.get("version") != VERSION:
        raise ScheduleError(f"{where} has schedule version {source.get('version')!r}; this graphprune reads version {VERSION}")
    recipe, options = source.get("recipe"), source.get("options")
    if not isinstance(recipe, str) or not isinstance(options, dict):
        raise ScheduleError(f"{where} needs a \"recipe\" name and an \"options\" object")
    info = {k: v for k, v in source.items() if k not in ("format", "version", "recipe", "options")}
    return Schedule(recipe, options, info)


def resolve(recipe: str | None, schedule, options: dict) -> tuple[str, dict]:
    """The recipe and options ``optimize`` applies: the schedule's, overridden by explicit options."""
    if schedule is None:
        if recipe is None:
            raise ScheduleError("give a recipe name (recipe='tome') or a schedule (schedule='schedule.json')")
        return recipe, options
    s = load_schedule(schedule)
    if recipe is not None and recipe != s.recipe:
        raise ScheduleError(f"the schedule is for recipe '{s.recipe}', not '{recipe}'; drop the recipe argument or use a "
                            f"schedule tuned for '{recipe}'")
    return s.recipe, {**s.options, **options}


__all__ = ["Schedule", "load_schedule", "resolve"]
