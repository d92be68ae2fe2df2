"""Token op library.

Each token-reduction primitive is defined once here as a ``torch.library`` custom op with
a fake (shape) implementation, an eager implementation, and an ONNX lowering
(:mod:`graphprune.ops.onnx`). Rewrite passes insert these ops as single graph nodes, so
they survive ``torch.export``, save/load of ``.pt2`` files and ONNX export.
"""

from graphprune.ops import evit, markers, pitome, select, tome  # noqa: F401  (registers the ops)
from graphprune.ops.evit import evit_keep_count
from graphprune.ops.tome import tome_effective_r

__all__ = ["evit_keep_count", "tome_effective_r"]
