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
    "map_pooled": ("vit_tiny_patch16_224", {"global_pool": "map", "class_token": False}),
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


# Hugging Face architectures: tiny random configs (transformers 5.x)
def _hf(cls_name: str, cfg_name: str, **kw):
    import transformers

    base = dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=3, intermediate_size=96)
    cfg = getattr(transformers, cfg_name)(**{**base, **kw})
    torch.manual_seed(0)
    return getattr(transformers, cls_name)(cfg).eval()


_VISION = dict(image_size=32, patch_size=4)
_TEXT = dict(vocab_size=100, max_position_embeddings=64)
HF = {
    "vit": lambda: _hf("ViTModel", "ViTConfig", **_VISION),
    "vit_classifier": lambda: _hf("ViTForImageClassification", "ViTConfig", num_labels=5, **_VISION),
    "deit_distilled": lambda: _hf("DeiTForImageClassificationWithTeacher", "DeiTConfig", num_labels=5, **_VISION),
    "dinov2": lambda: _hf("Dinov2Model", "Dinov2Config", **_VISION),
    "clip_vision": lambda: _hf("CLIPVisionModel", "CLIPVisionConfig", **_VISION),
    "siglip_vision": lambda: _hf("SiglipVisionModel", "SiglipVisionConfig", **_VISION),
    "bert": lambda: _hf("BertModel", "BertConfig", **_TEXT),
    "roberta": lambda: _hf("RobertaModel", "RobertaConfig", **_TEXT),
}
TEXT = {"bert", "roberta"}


def hf_inputs(key: str, batch: int = 3, seed: int = 1) -> tuple:
    """Images, or token ids with a padding mask (sample 1 and 2 padded on the right)."""
    g = torch.Generator().manual_seed(seed)
    if key not in TEXT:
        return (torch.randn(batch, 3, 32, 32, generator=g),)
    ids = torch.randint(3, 100, (batch, 20), generator=g)
    mask = torch.ones(batch, 20, dtype=torch.long)
    for b, length in zip(range(1, batch), (14, 9, 17)):
        mask[b, length:] = 0
        ids[b, length:] = 1  # the pad id
    return ids, mask
