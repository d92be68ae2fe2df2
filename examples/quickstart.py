"""Token Merging and EViT on a timm ViT, eager and ONNX, in a few lines.

    python examples/quickstart.py
"""

import tempfile
from pathlib import Path

import timm
import torch

import graphprune

model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()  # pretrained=True with hub access
x = torch.randn(4, 3, 224, 224)

# ToMe, eager: a new module; `model` itself is left untouched
fast = graphprune.optimize(model, recipe="tome", r=13)
print(fast.report.tokens_per_block, f"FLOPs x{fast.report.flop_ratio:.2f}")
with torch.no_grad():
    print("logit cosine vs original:", torch.nn.functional.cosine_similarity(fast(x), model(x)).mean().item())

with tempfile.TemporaryDirectory() as tmp:
    # EViT, ONNX: written atomically, validated in ONNX Runtime, returned as an ORT-backed callable
    onnx_model = graphprune.optimize(model, recipe="evit", keep=0.7, target="onnx", output=Path(tmp) / "deit_evit.onnx")
    print("ONNX parity (max |Δ| vs eager):", onnx_model.report.parity["onnx"])
    print("ORT output:", onnx_model(x).shape)

    # a .pt2 that reloads anywhere graphprune is installed
    path = fast.save(Path(tmp) / "deit_tome.pt2")
    print("reloaded:", graphprune.load(path)(x).shape)
