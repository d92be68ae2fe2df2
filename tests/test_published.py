"""Each recipe equals the published algorithm (direct per-sample implementation in reference.py)."""

import pytest
import torch

import graphprune
from graphprune.recipes.options import parse_r
from tests.conftest import images, tiny
from tests.reference import (
    ats_reference, diffrate_reference, evo_vit_reference, evit_reference, pitome_reference, ppt_reference, tome_reference, tome_split_reference, tps_reference,
    turbo_reference,
)

TOL = 1e-5


def _close(a, b):
    return float((a - b).abs().max())


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit"])
@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
@pytest.mark.parametrize("r", [3, (4, 0.5), [10, 8, 0, 6]], ids=["const", "ramp", "list"])
def test_tome_equals_published(name, r, fused):
    model = tiny(name, fused=fused)
    x = images(3)
    fast = graphprune.optimize(model, "tome", example_inputs=(x,), r=r)
    ref = tome_reference(model, x, parse_r(r, len(model.blocks)))
    with torch.no_grad():
        assert _close(fast(x), ref) < TOL
    assert fast.report.tokens_per_block[1] < fast.report.tokens_per_block[0] or parse_r(r, 4)[0] == 0


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit"])
@pytest.mark.parametrize("split,k,r", [("random", 2, [20, 9, 0, 5]), ("kth", 3, [4, 40, 3, 6]), ("kth", 2, [6, 6, 6, 6])])
def test_tome_splits_equal_published(split, k, r, fused):
    model = tiny("deit_tiny_patch16_224", fused=fused)
    x = images(3)
    fast = graphprune.optimize(model, "tome", example_inputs=(x,), r=r, split=split, k=k, seed=3)
    with torch.no_grad():
        assert _close(fast(x), tome_split_reference(model, x, r, split, k, seed=3)) < TOL
        # the split matters: the alternating split gives another result
        assert _close(fast(x), tome_reference(model, x, r)) > 1e-4


@pytest.mark.parametrize("metric", ["keys_concat", "tokens"])
def test_tome_metrics_equal_the_reference(metric):
    model = tiny("deit_tiny_distilled_patch16_224")
    x = images(3)
    fast = graphprune.optimize(model, "tome", example_inputs=(x,), r=[9, 0, 7, 5], metric=metric)
    with torch.no_grad():
        assert _close(fast(x), tome_reference(model, x, [9, 0, 7, 5], metric=metric)) < TOL
        # the features matter: the published keys merge other tokens
        assert _close(fast(x), tome_reference(model, x, [9, 0, 7, 5])) > 1e-4


def test_tome_kth_merges_every_source_when_r_covers_them():
    """r >= |A|: the published kth_bipartite_soft_matching, N patch tokens -> N // k."""
    model = tiny("deit_tiny_patch16_224")
    fast = graphprune.optimize(model, "tome", example_inputs=(images(2),), r=[1000, 0, 0, 0], split="kth", k=4)
    patches = fast.report.tokens_per_block[0] - 1
    assert fast.report.tokens_per_block[1] == 1 + patches // 4


def test_tome_without_proportional_attention_equals_published():
    model = tiny("deit_tiny_patch16_224")
    x = images(2)
    fast = graphprune.optimize(model, "tome", example_inputs=(x,), r=5, prop_attn=False)
    with torch.no_grad():
        assert _close(fast(x), tome_reference(model, x, [5] * 4, prop_attn=False)) < TOL
        # and proportional attention really changes the result
        assert _close(fast(x), tome_reference(model, x, [5] * 4, prop_attn=True)) > 1e-4


def test_tome_mean_pooled_weights_pool_by_size():
    model = tiny("vit_tiny_patch16_224", global_pool="avg", class_token=False)
    x = images(2)
    fast = graphprune.optimize(model, "tome", example_inputs=(x,), r=6)
    with torch.no_grad():
        assert _close(fast(x), tome_reference(model, x, [6] * 4)) < TOL


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit"])
@pytest.mark.parametrize("keep,locations", [(0.7, None), (0.5, [0, 2])])
def test_evit_equals_published(keep, locations, fused):
    model = tiny("deit_tiny_patch16_224", fused=fused)
    x = images(3)
    opts = {"keep": keep} if locations is None else {"keep": keep, "locations": locations}
    fast = graphprune.optimize(model, "evit", example_inputs=(x,), **opts)
    where = locations if locations is not None else [1, 2, 3]  # ⌊L/4⌋, ⌊L/2⌋, ⌊3L/4⌋ for L = 4
    with torch.no_grad():
        assert _close(fast(x), evit_reference(model, x, keep, where)) < TOL
    assert fast.report.tokens_per_block[-1] < 65


def test_evit_default_locations_for_12_blocks():
    model = tiny("deit_tiny_patch16_224", depth=12)
    fast = graphprune.optimize(model, "evit", example_inputs=(images(2),), keep=0.5)
    t = fast.report.tokens_per_block
    changes = [i for i in range(1, 12) if t[i] != t[i - 1]]
    assert changes == [4, 7, 10]  # reduced inside blocks 3, 6, 9


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit"])
def test_diffrate_equals_published(fused):
    model = tiny("deit_tiny_patch16_224", fused=fused)
    x = images(3)
    prune, merge = [65, 60, 44, 30], [65, 50, 40, 30]
    fast = graphprune.optimize(model, "diffrate", example_inputs=(x,), prune=prune, merge=merge)
    assert fast.report.tokens_per_block == [65, 65, 50, 40]
    with torch.no_grad():
        assert _close(fast(x), diffrate_reference(model, x, prune, merge)) < TOL


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit"])
def test_tps_equals_published(fused):
    model = tiny("deit_tiny_patch16_224", fused=fused)
    x = images(3)
    fast = graphprune.optimize(model, "tps", example_inputs=(x,), keep=0.7)
    assert fast.report.tokens_per_block == [65, 65, 1 + 44, 1 + 31]  # int(64·0.7), int(64·0.49)
    with torch.no_grad():
        assert _close(fast(x), tps_reference(model, x, 0.7, [1, 2, 3])) < TOL


@pytest.mark.parametrize("threshold", [0.0, 1.0, 2.2e-4], ids=["prune", "pool", "mixed"])
def test_ppt_equals_published(threshold):
    model = tiny("deit_tiny_patch16_224")
    x = images(4)
    fast = graphprune.optimize(model, "ppt", example_inputs=(x,), r=12, threshold=threshold)
    assert fast.report.tokens_per_block == [65, 65, 53, 41]
    with torch.no_grad():
        assert _close(fast(x), ppt_reference(model, x, 12, [1, 2, 3], threshold)) < TOL


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit"])
def test_pitome_equals_published(fused):
    model = tiny("deit_tiny_patch16_224", fused=fused)
    x = images(3)
    fast = graphprune.optimize(model, "pitome", example_inputs=(x,), ratio=0.85)
    assert fast.report.tokens_per_block == [65, 56, 48, 41]  # floor(64·0.15) = 9, then 8, 7
    with torch.no_grad():
        assert _close(fast(x), pitome_reference(model, x, 0.85)) < TOL


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit"])
@pytest.mark.parametrize("capacity,locations", [(40, [1, 2, 3]), (64, [1, 3]), (20, [2])])
def test_ats_fixed_capacity_equals_per_image_compaction(capacity, locations, fused):
    """The exported form (fixed capacity, padding masked) equals ATS run image by image with its own count."""
    model = tiny("deit_tiny_patch16_224", fused=fused)
    x = images(3)
    fast = graphprune.optimize(model, "ats", example_inputs=(x,), capacity=capacity, locations=locations)
    with torch.no_grad():
        assert _close(fast(x), ats_reference(model, x, capacity, locations)) < TOL


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit"])
@pytest.mark.parametrize("keep,locations", [(0.5, [1, 3]), (0.3, [2]), (0.6, [1, 2])])
def test_evo_vit_equals_published(keep, locations, fused):
    model = tiny("deit_tiny_patch16_224", fused=fused)
    x = images(3)
    fast = graphprune.optimize(model, "evo_vit", example_inputs=(x,), keep=keep, locations=locations)
    with torch.no_grad():
        assert _close(fast(x), evo_vit_reference(model, x, keep, locations)) < TOL
    assert fast.report.tokens_per_block[locations[0]] == 1 + int(64 * keep)


def test_evo_vit_slow_tokens_wait_and_come_back():
    """Per-token outputs keep every token; with one stage at the last block, the 48 slow patch tokens come out
    as they entered it, and the 16 fast ones are updated."""

    class Features(torch.nn.Module):
        def __init__(self, vit):
            super().__init__()
            self.vit = vit

        def forward(self, x):
            return self.vit.forward_features(x)

    model = tiny("deit_tiny_patch16_224")
    x = images(2)
    fast = graphprune.optimize(Features(model), "evo_vit", example_inputs=(x,), keep=0.25, locations=[3])
    with torch.no_grad():
        out = fast(x)
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        waited = model.norm(model.blocks[:3](h))
    assert out.shape == waited.shape
    same = ((out - waited).abs().amax(dim=-1) < 1e-6)[:, 1:]
    assert same.sum(dim=1).tolist() == [48, 48]


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit"])
@pytest.mark.parametrize("r, alpha, min_tokens", [(3, 5.0, 0), ([10, 8, 0, 6], 0.2, 0), ([6, 6, 6, 6], 1.0, 50),
                                                  ([6, 6, 6, 6], 0.0, 0)])
def test_turbo_equals_published(r, alpha, min_tokens, fused):
    """Turbo: ToMe's matching with the even tokens ranked by redundancy − 30·α·(class attention); no merging below
    min_tokens. Its semantic term changes which tokens merge (α = 0 is ToMe)."""
    model = tiny("deit_tiny_patch16_224", fused=fused)
    x = images(3)
    fast = graphprune.optimize(model, "turbo", example_inputs=(x,), r=r, alpha=alpha, min_tokens=min_tokens)
    rs = parse_r(r, len(model.blocks))
    with torch.no_grad():
        assert _close(fast(x), turbo_reference(model, x, rs, alpha, min_tokens)) < TOL
        if alpha == 0:
            assert _close(fast(x), tome_reference(model, x, rs)) < TOL
        else:
            assert _close(fast(x), tome_reference(model, x, rs)) > 1e-4
    counts = fast.report.tokens_per_block
    assert counts[1] == counts[0] - (0 if counts[0] < min_tokens else rs[0])


def test_turbo_needs_a_class_token_and_sound_options():
    from graphprune.errors import RecipeError, ScheduleError

    with pytest.raises(RecipeError, match="no class token"):
        graphprune.optimize(tiny("vit_tiny_patch16_224", class_token=False, global_pool="avg"), "turbo",
                            example_inputs=(images(2),), r=2)
    for bad, match in [({"alpha": -1.0}, "alpha must be a number ≥ 0"), ({"min_tokens": 2.5}, "min_tokens must be an int")]:
        with pytest.raises(ScheduleError, match=match):
            graphprune.optimize(tiny("deit_tiny_patch16_224"), "turbo", example_inputs=(images(2),), **bad)


def test_turbo_exports_on_timm_and_hugging_face_clip(tmp_path):
    """The semantic term lowers to ONNX with the merge (ORT parity, checked before writing, and on another batch);
    on Hugging Face's CLIP vision tower (the LLaVA family's) the class token's attention is found the same way."""
    from graphprune.report import max_abs_diff
    from tests.conftest import HF, hf_inputs

    model, x = tiny("deit_tiny_patch16_224"), images(2)
    onnx = graphprune.optimize(model, "turbo", target="onnx", output=tmp_path / "t.onnx", example_inputs=(x,), r=5,
                               min_tokens=0)
    with torch.no_grad():
        assert max_abs_diff(onnx(images(3, seed=5)), turbo_reference(model, images(3, seed=5), [5] * 4, 5.0, 0)) <= 1e-4
    clip = HF["clip_vision"]()
    xs = hf_inputs("clip_vision")
    fast = graphprune.optimize(clip, "turbo", example_inputs=xs, r=4, min_tokens=0)
    assert fast.report.tokens_per_block[1] == fast.report.tokens_per_block[0] - 4
    onnx = graphprune.optimize(clip, "turbo", target="onnx", output=tmp_path / "c.onnx", example_inputs=xs, r=4,
                               min_tokens=0)
    with torch.no_grad():
        assert max_abs_diff(onnx(*xs), fast(*xs)) <= 1e-4
