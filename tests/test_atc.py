"""ATC's batched clustering equals agglomerative clustering by definition (and SciPy's), per linkage."""

import pytest
import torch

import graphprune
from graphprune.ops.cluster import agglomerative_merge
from tests.conftest import images, tiny
from tests.reference import agglomerative_one, atc_reference


def _clusters(assign, protected):
    groups = {}
    for t, slot in enumerate(assign.tolist()[protected:]):
        groups.setdefault(slot, []).append(t)
    return sorted(groups.values())


@pytest.mark.parametrize("linkage", ["average", "complete", "single"])
def test_clusters_equal_naive_agglomerative_clustering(linkage):
    g = torch.Generator().manual_seed(0)
    metric = torch.randn(3, 21, 6, generator=g)
    x = torch.randn(3, 21, 4, generator=g)
    out, size, assign, rep = agglomerative_merge(x, torch.ones(3, 21, 1), metric, 7, 1, 21, linkage)
    for b in range(3):
        expected = agglomerative_one(metric[b, 1:], 7, linkage)
        assert _clusters(assign[b], 1) == expected
        assert [assign[b, 1 + c[0]].item() for c in expected] == list(range(1, 8))  # ordered by lowest member
        torch.testing.assert_close(out[b, 1:], torch.stack([x[b, [1 + t for t in c]].mean(0) for c in expected]))
        assert size[b, :, 0].tolist() == [1.0] + [float(len(c)) for c in expected]


@pytest.mark.parametrize("linkage", ["average", "complete", "single"])
def test_clusters_equal_scipy(linkage):
    hierarchy = pytest.importorskip("scipy.cluster.hierarchy")
    g = torch.Generator().manual_seed(1)
    metric = torch.randn(2, 30, 8, generator=g, dtype=torch.float64)
    _, _, assign, _ = agglomerative_merge(metric[..., :2], torch.ones(2, 30, 1, dtype=torch.float64), metric, 9, 0, 30, linkage)
    for b in range(2):
        m = metric[b] / metric[b].norm(dim=-1, keepdim=True)
        d = (1 - m @ m.T).clamp(min=0).numpy()
        condensed = d[torch.triu_indices(30, 30, 1).unbind()]
        labels = hierarchy.fcluster(hierarchy.linkage(condensed, method=linkage), 9, criterion="maxclust")
        scipy_groups = sorted(sorted(int(t) for t in (labels == c).nonzero()[0]) for c in set(labels))
        assert _clusters(assign[b], 0) == scipy_groups


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit"])
@pytest.mark.parametrize("keep,locations,linkage", [(0.7, [1, 2], "average"), (0.5, [0, 2], "complete"), (0.6, [1], "single")])
def test_atc_equals_published(keep, locations, linkage, fused):
    model = tiny("deit_tiny_patch16_224", fused=fused)
    x = images(2)
    fast = graphprune.optimize(model, "atc", example_inputs=(x,), keep=keep, locations=locations, linkage=linkage)
    with torch.no_grad():
        assert float((fast(x) - atc_reference(model, x, keep, locations, linkage)).abs().max()) < 1e-5
