"""Schedules: saved schedule files (:mod:`~graphprune.schedule.files`) and the latency-aware tuner
(:mod:`~graphprune.schedule.tune`). The recipes' own option parsers live in :mod:`graphprune.recipes.options`."""
