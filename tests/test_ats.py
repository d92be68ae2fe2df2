"""ATS sampling: the kept count follows the score distribution; the padding slots stay out of the way."""

import pytest
import torch

import graphprune
import graphprune.recipes.ats as ats_recipe
from graphprune.ops.ats import ats_sample
from tests.conftest import images, tiny
from tests.reference import ats_reference


def _sample(scores, samples, protected=1):
    b, n = scores.shape
    x = torch.arange(b * n * 2, dtype=torch.float32).reshape(b, n, 2)
    return ats_sample(x, scores, samples, protected, n)


def test_peaked_scores_keep_few_tokens():
    """Nine tokens at 0.01 and one at 0.91: the normalised CDF is 0, 0.0101, ..., 0.0808, 1. Ten points from
    0.0101 to 1 pick the first positive CDF token, the 0.0808 one (points below 0.54) and the top one: 3 kept."""
    s = torch.tensor([[5.0] + [0.01] * 9 + [0.91]])  # the class token's own score is ignored
    out, assign, rep, size = _sample(s, 10)
    assert size[0, :, 0].tolist() == [1.0, 1.0, 1.0, 1.0] + [0.0] * 7
    assert rep[0, :4].tolist() == [0, 2, 9, 10]  # cls, then ascending significance (ties: lower index)
    assert (assign[0] >= 0).sum() == 4 and assign[0, 10] == 3 and assign[0, 1] == -1


def test_uniform_scores_keep_more_than_peaked_and_capacity_bounds_the_count():
    flat = torch.ones(1, 33)
    peaked = torch.cat([torch.ones(1, 1), torch.linspace(0, 1, 32)[None] ** 8], dim=1)
    kept = lambda s, k: int(_sample(s, k)[3].sum()) - 1  # noqa: E731
    assert kept(flat, 32) > kept(peaked, 32) >= 2
    out, assign, rep, size = _sample(flat, 12)
    assert out.shape[1] == 13 and kept(flat, 12) <= 12


def test_each_sample_has_its_own_count_and_padding_points_at_kept_tokens():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(4, 41, generator=g) ** torch.tensor([[1.0], [4.0], [12.0], [0.2]])
    out, assign, rep, size = _sample(s, 40)
    counts = size[..., 0].sum(1).tolist()
    assert len(set(counts)) > 1  # variable per image
    for b in range(4):
        k = int(counts[b])
        kept = rep[b, :k]
        assert len(set(kept.tolist())) == k  # distinct tokens in the valid slots
        assert set(rep[b, k:].tolist()) <= set(kept.tolist())  # padding copies a kept token
        assert sorted(assign[b][assign[b] >= 0].tolist()) == list(range(k))
        torch.testing.assert_close(out[b, :k], torch.arange(41 * 2, dtype=torch.float32).reshape(41, 2)[kept] + b * 82)


def test_padding_takes_no_part_in_the_sampling():
    """Padding left by an earlier sampling (size 0, score 0) changes nothing: each image keeps the tokens it keeps
    with the padding gone, whatever the other images' padding (the CDF minimum is the least significant real
    token's value, not the padding's 0)."""
    g = torch.Generator().manual_seed(0)
    n, samples, real = 33, 32, [32, 25, 17]
    s = torch.rand(3, n, generator=g) ** torch.tensor([[1.0], [4.0], [10.0]])
    size = torch.zeros(3, n, 1)
    for b, k in enumerate(real):
        size[b, : 1 + k] = 1.0
    s = s * size[..., 0]  # padding is masked out of attention: its score is 0
    x = torch.arange(3 * n * 2, dtype=torch.float32).reshape(3, n, 2)
    _, _, rep, out_size = ats_sample(x, s, samples, 1, n, size)
    for b, k in enumerate(real):
        _, _, alone, alone_size = ats_sample(x[b : b + 1, : 1 + k], s[b : b + 1, : 1 + k], samples, 1, 1 + k)
        count = int(alone_size.sum())
        assert int(out_size[b].sum()) == count < 1 + k
        assert rep[b, :count].tolist() == alone[0, :count].tolist()


_SEEN: list = []


def _record(size):
    _SEEN.append(size[..., 0].sum(1).round().long().tolist())
    return size


def _recording_counts(monkeypatch) -> list:
    """Make the ATS recipe's graph report, each time it runs, every image's token count after each sampling block:
    the sizes ``ats_sample`` returns pass through ``_record`` (a leaf call in the graph)."""

    def sample(*args):
        out = ats_sample(*args)
        size = out[3]
        return (*out[:3], size.tracer.create_proxy("call_function", _record, (size,), {}))

    monkeypatch.setattr(ats_recipe, "ats_sample", sample)
    _SEEN.clear()
    return _SEEN


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit"])
def test_recipe_equals_official_drop_tokens_one_image_at_a_time(fused, monkeypatch):
    """The authors' shipped config (DROP_TOKENS, one image at a time, capacity 1.0): at every sampling block each
    image keeps the tokens that real per-image compaction keeps, and the logits agree. Sharpened attention
    (q and k scaled) makes the counts fall and differ per image, so the fixed-capacity graph carries padding
    into every sampling block after the first."""
    model = tiny("deit_tiny_patch16_224", fused=fused, depth=5)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight[: 2 * blk.attn.qkv.in_features] *= 5.0
    x = images(3)
    seen = _recording_counts(monkeypatch)
    fast = graphprune.optimize(model, "ats", example_inputs=(x,), capacity=1.0)  # samples in blocks 1-4 (from L/4)
    seen.clear()
    with torch.no_grad():
        out = fast(x)
    ref, kept = ats_reference(model, x, 64, [1, 2, 3, 4], counts=True)
    assert [list(c) for c in zip(*seen)] == kept
    assert all(k[0] < 65 for k in kept) and len({tuple(k) for k in kept}) > 1  # padding from block 2 on; per image
    assert float((out - ref).abs().max()) < 1e-5
