"""Tiny timm models built in-process (random weights, nothing downloaded)."""

from __future__ import annotations

import pytest
import timm
import torch

import graphprune  # noqa: F401  (registers the ops)

SMALL = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3)  # 64 patches

# name -> (timm model, overrides): the families graphprune must handle
FAMILIES = {
    "vit": ("vit_tiny_patch16_224", {}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "deit3_layerscale": ("deit3_small_patch16_224", {"init_values": 0.5}),
    "reg4": ("vit_small_patch14_reg4_dinov2", {"init_values": 0.5}),
    "clip_norm_pre": ("vit_base_patch16_clip_224", {}),
    "mean_pooled": ("vit_tiny_patch16_224", {"global_pool": "avg", "class_token": False}),
    "mean_pooled_cls": ("vit_tiny_patch16_224", {"global_pool": "avg"}),
    "reg4_gap": ("vit_medium_patch16_reg4_gap_256", {}),
    "qk_norm": ("vit_tiny_patch16_224", {"qk_norm": True}),
}


def tiny(name: str, fused: bool = True, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    kw = {**SMALL, **overrides}
    model = timm.create_model(name, pretrained=False, num_classes=10, **kw).eval()
    if not fused:
        for m in model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = False
    return model


def family(key: str, **extra) -> torch.nn.Module:
    name, kw = FAMILIES[key]
    return tiny(name, **{**kw, **extra})


def images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=g)


@pytest.fixture
def x():
    return images(3)
