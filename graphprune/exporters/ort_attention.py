"""An ONNX Runtime copy of an exported graph whose attention runs fused.

PyTorch exports ``scaled_dot_product_attention`` as MatMul, Softmax, MatMul: ONNX Runtime then writes the (B, H, N, N)
logits and probabilities of every attention, 17 GB per attention of SD 1.5's UNet at 1024² (16,384 tokens) in float32.
ONNX Runtime's own ``com.microsoft`` MultiHeadAttention runs as a flash attention on the CPU (it never holds the
logits). onnxscript's ONNX Runtime fusions (``fuse_sdpa``, then ``replace_sdpa_by_mha``) rewrite the graph's
attention into it; nothing else in the graph changes.

The copy is written beside the portable graph and reads the same weights file: the portable graph stays the artifact
for other runtimes (OpenVINO, TensorRT), the copy is what ONNX Runtime runs.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def fuse_attention(src: Path, dst: Path) -> int:
    """Write ``src`` (an ONNX graph with external weights) to ``dst``, in the same folder, with its attention fused;
    returns how many attentions were fused (0: nothing written)."""
    if Path(src).parent != Path(dst).parent:
        raise ValueError("the fused copy goes beside its graph (it reads the graph's weights file)")
    try:
        import onnx_ir as ir
        from onnxscript.rewriter.ort_fusions.sdpa import fuse_sdpa
        from onnxscript.rewriter.ort_fusions.sdpa_via_mha import replace_sdpa_by_mha

        model = ir.load(src)  # (the weights stay in their file, read only where a rewrite needs them)
        fused = fuse_sdpa(model, apply_shape_inference=True)
        if fused and replace_sdpa_by_mha(model) != fused:
            return 0  # (an attention left half-rewritten: run the portable graph)
    except Exception as err:  # noqa: BLE001  (an optimisation: without these fusions the portable graph runs)
        log.info("attention left unfused: %s", err)
        return 0
    if fused:
        ir.passes.common.RemoveUnusedNodesPass()(model)  # (and the initializers only the old attention read)
        ir.save(model, dst)  # (external tensors keep their file and offsets)
    return fused
