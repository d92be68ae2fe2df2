"""Zero-TPrune's primitives on hand-made attention graphs, and the recipe against a direct implementation."""

import math

import pytest
import torch

import graphprune
from graphprune.recipes.zero_tprune import similar_half, weighted_pagerank
from tests.conftest import images, tiny
from tests.reference import zero_tprune_reference

# t0 attends to t1, t1 to t2, t2 to itself, t3 to t0
CHAIN = torch.tensor([[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0], [1, 0, 0, 0]], dtype=torch.float32)


@pytest.mark.parametrize("iterations,expected", [(1, [0.25, 0.25, 0.5, 0]), (2, [0, 0.25, 0.75, 0]), (3, [0, 0, 1, 0])])
def test_pagerank_follows_attention_to_the_tokens_attended_by_important_ones(iterations, expected):
    s = weighted_pagerank(CHAIN[None, None], 4, iterations, has_cls=False)
    torch.testing.assert_close(s[0], torch.tensor(expected, dtype=torch.float32))


def test_class_token_starts_with_sqrt_n_weight():
    s = weighted_pagerank(CHAIN[None, None], 4, 1, has_cls=True)  # start [2, 1, 1, 1] / 5
    torch.testing.assert_close(s[0], torch.tensor([1.0, 2, 1 + 1, 0]) / 5)


def test_heads_combine_by_root_mean_square_over_informative_heads():
    uniform = torch.full((4, 4), 0.25)  # every score equal: variance of N·s is 0, filtered out
    star = torch.zeros(4, 4)
    star[:, 2] = 1  # N·s = [0, 0, 4, 0]: variance 3, filtered out
    pairs = torch.tensor([[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.float32)  # variance 0.5
    one = lambda a: weighted_pagerank(a[None, None], 4, 1, has_cls=False)[0]  # noqa: E731
    both = weighted_pagerank(torch.stack([star, CHAIN, uniform, pairs])[None], 4, 1, has_cls=False)[0]
    torch.testing.assert_close(both, ((one(CHAIN) ** 2 + one(pairs) ** 2) / 2).sqrt())
    # no head passes the filter: all heads count
    torch.testing.assert_close(weighted_pagerank(torch.stack([uniform, star])[None], 4, 1, has_cls=False)[0],
                               ((one(uniform) ** 2 + one(star) ** 2) / 2).sqrt())


def test_similarity_stage_drops_the_less_important_near_duplicates():
    importance = torch.tensor([[9.0, 6, 5, 4, 3, 2, 1]])  # cls; B = {1, 2, 3} (more important), A = {4, 5, 6}
    metric = torch.tensor([[[1.0, 0], [1, 0], [0, 1], [-1, -1], [0.1, 1], [1, 0.05], [-1, 1]]])
    gone = similar_half(importance, metric, 7, 2, protected=1)
    # 4 ~ token 2 and 5 ~ token 1 are near-duplicates; 6's best match (token 2) is only at cos 0.71
    assert gone[0].tolist() == [False, False, False, False, True, True, False]


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit"])
@pytest.mark.parametrize("keep,similar,locations", [(0.7, 0.5, [1, 2]), (0.5, 0.0, [0, 3]), (0.6, 1.0, [2])])
def test_zero_tprune_equals_direct_implementation(keep, similar, locations, fused):
    model = tiny("deit_tiny_patch16_224", fused=fused)
    x = images(3)
    fast = graphprune.optimize(model, "zero_tprune", example_inputs=(x,), keep=keep, similar=similar, locations=locations)
    with torch.no_grad():
        ref = zero_tprune_reference(model, x, keep, similar, locations)
        assert float((fast(x) - ref).abs().max()) < 1e-5
    n = 65
    for i, count in enumerate(fast.report.tokens_per_block[1:], start=1):
        if i - 1 in locations:
            n = 1 + math.ceil(keep * (n - 1))
        assert count == n
