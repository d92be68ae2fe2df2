"""Lowering the rewritten graph: eager module, ONNX model (validated in ONNX Runtime), TensorRT."""
