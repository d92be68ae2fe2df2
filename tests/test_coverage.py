"""Every supported timm family: zero reduction is exact, reduction runs, ONNX matches eager."""

import pytest
import torch

import graphprune
from graphprune.errors import UnsupportedArchitectureError
from graphprune.recipes import RECIPES
from tests.conftest import FAMILIES, family, images, tiny

def _diff(a, b):
    return float((a - b).abs().max())


ALL_RECIPES = {"deit_distilled", "reg4_gap", "map_pooled"}  # every recipe's no-op here; tome and evit everywhere


@pytest.mark.parametrize("key", sorted(FAMILIES))
def test_zero_reduction_reproduces_original(key):
    model = family(key)
    x = images(3)
    with torch.no_grad():
        expected = model(x)
        names = graphprune.list_recipes("tokens") if key in ALL_RECIPES else ["evit", "tome"]
        for name in names:
            fast = graphprune.optimize(model, name, example_inputs=(x,), **RECIPES[name].zero)
            assert _diff(fast(x), expected) <= 1e-5, name
            assert fast.report.tokens_per_block == [fast.report.tokens_per_block[0]] * len(model.blocks)


EVIT = {"keep": 0.5, "locations": [1, 3]}  # (on three families by default; on the others in the slow run: .ci/run)
CASES = [(key, "tome", {"r": 6}) for key in sorted(FAMILIES)]
CASES += [(key, "evit", EVIT) if key in ("deit_distilled", "map_pooled", "reg4_gap") else
          pytest.param(key, "evit", EVIT, marks=pytest.mark.slow) for key in sorted(FAMILIES)]
CASES += [(key, name, {}) for key in ("deit_distilled", "reg4_gap") for name in ("diffrate", "tps", "ppt", "pitome")]
CASES += [("reg4_gap", name, {}) for name in ("ats", "zero_tprune", "evo_vit")]
CASES += [pytest.param("deit_distilled", "atc", {}, marks=pytest.mark.slow)]  # (36 s: its ONNX export runs in the
# slow set, which .ci/run runs, as on BERT; ATC's clustering against its definition is in test_atc.py)
CASES += [pytest.param("qk_norm", name, {}, marks=pytest.mark.slow) for name in ("diffrate", "tps", "ppt", "pitome")]


def _id(case):
    key, recipe, _ = case.values if hasattr(case, "values") else case
    return f"{key}-{recipe}"


@pytest.mark.parametrize("key,recipe,opts", CASES, ids=[_id(c) for c in CASES])
def test_reduction_runs_and_exports(key, recipe, opts, tmp_path):
    model = family(key)
    x = images(2)
    onnx = graphprune.optimize(model, recipe, target="onnx", output=tmp_path / recipe / "m.onnx", example_inputs=(x,), **opts)
    rep = onnx.report
    assert rep.tokens_per_block[-1] < rep.tokens_per_block[0]
    assert rep.flops_after < rep.flops_before
    assert rep.parity["onnx"] <= 1e-4
    eager = graphprune.optimize(model, recipe, example_inputs=(x,), **opts)
    x5 = images(5, seed=7)  # another batch size: the batch axis is dynamic
    with torch.no_grad():
        assert _diff(onnx(x5), eager(x5)) <= 1e-4


def test_layout_detection():
    cases = {
        "vit": (1, "cls"), "deit_distilled": (2, "cls"), "reg4": (5, "cls"),
        "mean_pooled": (0, "mean"), "mean_pooled_cls": (1, "mean"), "reg4_gap": (4, "mean"),
    }
    for key, (prefix, pooling) in cases.items():
        rep = graphprune.optimize(family(key), "tome", example_inputs=(images(2),), r=0).report
        assert (rep.layout["prefix_tokens"], rep.layout["pooling"]) == (prefix, pooling), key
    roles = graphprune.optimize(family("reg4"), "tome", example_inputs=(images(2),), r=0).report.layout["roles"]
    assert roles == ["cls"] + ["register"] * 4


def test_protected_tokens_survive_aggressive_merging():
    """cls and distillation tokens stay in place even when nearly everything merges."""
    model = family("deit_distilled")
    x = images(2)
    fast = graphprune.optimize(model, "tome", example_inputs=(x,), r=[32, 16, 8, 4])
    assert fast.report.tokens_per_block == [66, 34, 18, 10]
    with torch.no_grad():
        fast(x)


def test_attention_pool_sees_restored_tokens_as_size_bias():
    """An attention-pooling head (MAP) over restored tokens (each merged token repeated size times) equals the
    head over the reduced tokens with + log(size) on its keys: the two ways of handling sizes agree."""
    model, x = family("map_pooled"), images(2)
    restored = graphprune.optimize(model, "tome", example_inputs=(x,), r=6)
    reduced = graphprune.optimize(model, "tome", example_inputs=(x,), r=6, restore_tokens=False)
    assert reduced.report.layout["pooling"] == "attention"
    with torch.no_grad():
        assert _diff(restored(x), reduced(x)) <= 1e-5
        assert _diff(restored(x), model(x)) > 1e-4


def test_evit_without_class_token_ranks_by_received_attention():
    """No class token (mean pooling): tokens are ranked by the attention they receive from all queries."""
    from graphprune.patterns import analyze
    from graphprune.capture import capture
    from graphprune.recipes.evit import cls_attention

    model, x = family("mean_pooled"), images(2)
    graph = analyze(capture(model, (x,)))
    assert graph.layout.prefix == 0
    site = graph.blocks[1].site
    score_fn, _ = cls_attention(site, has_cls=False)
    blk = model.blocks[1]
    with torch.no_grad():
        h = model.patch_embed(x) + model.pos_embed
        h = model.blocks[0](h)
        qkv = blk.attn.qkv(blk.norm1(h)).reshape(2, 64, 3, 3, 16).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]
        probs = ((q @ k.transpose(-2, -1)) * 16**-0.5).softmax(-1)
        torch.testing.assert_close(score_fn(q, k), probs.mean(dim=(1, 2)))
        fast = graphprune.optimize(model, "evit", example_inputs=(x,), keep=0.5)
        assert fast.report.tokens_per_block == [64, 64, 33, 18]  # ceil(0.5·64)+1 fused, then ceil(0.5·33)+1


@pytest.mark.parametrize(
    "name,kw,reason",
    [
        ("swin_tiny_patch4_window7_224", dict(img_size=56, embed_dim=24, depths=(1, 1), num_heads=(1, 2)), "windowed|token sequence"),
        ("beit_base_patch16_224", dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3), "fixed token count|position"),
        ("pit_ti_224", dict(img_size=64), "token sequence|fixed token count|convolution"),
        ("vit_small_patch16_rope_224", dict(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3), "fixed token count|rotary"),
    ],
)
def test_unsupported_architectures_are_refused_with_a_reason(name, kw, reason):
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kw).eval()
    size = kw.get("img_size", 224)
    with pytest.raises(UnsupportedArchitectureError, match=reason):
        graphprune.optimize(model, "tome", example_inputs=(torch.randn(2, 3, size, size),), r=2)


def test_no_attention_is_refused():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
    with pytest.raises(UnsupportedArchitectureError, match="attention"):
        graphprune.optimize(model, "tome", example_inputs=(torch.randn(2, 3, 8, 8),))


def test_explicit_attention_form_exports():
    model = tiny("vit_tiny_patch16_224", fused=False, qk_norm=True)
    x = images(2)
    with torch.no_grad():
        assert _diff(graphprune.optimize(model, "tome", example_inputs=(x,), r=0)(x), model(x)) <= 1e-5
