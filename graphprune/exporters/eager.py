"""The eager target: the rewritten graph as a module, savable as a ``torch.export`` .pt2."""

from __future__ import annotations

from pathlib import Path

import torch

from graphprune.calls import CallMap
from graphprune.buckets import check_length
from graphprune.capture import export
from graphprune.exporters.files import atomic_path
from graphprune.report import Report


class OptimizedModel(torch.nn.Module):
    """The rewritten model. Call it like the original; ``.report`` says what was done."""

    def __init__(self, gm: torch.fx.GraphModule, report: Report, example_inputs: tuple, calls: CallMap | None = None,
                 max_tokens: int | None = None):
        super().__init__()
        self.gm = gm
        self.report = report
        self.example_inputs = example_inputs
        self.calls = calls  # how the original's calls map to the graph's inputs (None: as captured)
        self.max_tokens = max_tokens  # a text model captured with a symbolic length: the longest (None: as captured)

    def forward(self, *args, **kwargs):
        if self.calls is not None:
            args, kwargs = self.calls(args, kwargs), {}
        if self.max_tokens is not None and args:
            check_length(args[0].shape[1], self.max_tokens)
        with torch.no_grad():  # inference only (the token ops have no gradients), so torch.compile traces no backward
            return self.gm(*args, **kwargs)

    def export(self) -> torch.export.ExportedProgram:
        """The rewritten model as an ExportedProgram with a dynamic batch dimension."""
        return export(self.gm, self.example_inputs, self.max_tokens, rewritten=True)  # (the original signature)

    def save(self, path) -> Path:
        """Write a ``.pt2`` file; reload it with ``graphprune.load(path)``."""
        path = Path(path)
        program = self.export()
        with atomic_path(path) as tmp:
            torch.export.save(program, tmp)
        return path


def load(path) -> torch.nn.Module:
    """Load a ``.pt2`` written by :meth:`OptimizedModel.save` (graphprune's ops are registered on import)."""
    return torch.export.load(str(path)).module()
