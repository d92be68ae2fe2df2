"""Graph rewrites, one per kind of edit.

Passes insert code into the captured graph by calling ordinary torch functions on FX
proxies (:func:`emit`), so the inserted computation reads like eager code and is
re-traced to ATen by ``torch.export`` when the graph is saved or exported.
"""

from graphprune.passes.bias import add_attention_bias
from graphprune.passes.cleanup import remove_markers
from graphprune.passes.emit import emit, emit_before
from graphprune.passes.layout import pin_attention_layout
from graphprune.passes.pooling import size_weighted_pooling
from graphprune.passes.reduce import reduce_after_residual

__all__ = ["add_attention_bias", "emit", "emit_before", "pin_attention_layout", "reduce_after_residual", "remove_markers", "size_weighted_pooling"]
