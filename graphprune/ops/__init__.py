"""Token op library.

Each token-reduction primitive is defined once here, in one of two forms: a
``torch.library`` custom op with a fake (shape) implementation, an eager implementation and
an ONNX lowering (:mod:`graphprune.ops.onnx`), inserted as a single graph node; or plain
tensor code with static shapes (``bipartite``, ``ats``, ``pagerank``, ``cluster``), traced
into the graph, which torch.export and the ONNX exporter handle as they are.
"""

from graphprune.ops import evit, markers, pitome, select, tome  # noqa: F401  (registers the ops)
from graphprune.ops.evit import evit_keep_count
from graphprune.ops.tome import tome_effective_r

__all__ = ["evit_keep_count", "tome_effective_r"]
