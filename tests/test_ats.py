"""ATS sampling: the kept count follows the score distribution; the padding slots stay out of the way."""

import torch

from graphprune.ops.ats import ats_sample


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
