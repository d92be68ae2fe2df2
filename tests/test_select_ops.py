"""Score-ranked selection ops: prune and merge_nearest, by definition and in ONNX."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch.export import Dim

import graphprune  # noqa: F401
from graphprune.ops.onnx import TRANSLATIONS

PRUNE = torch.ops.graphprune.prune
MERGE = torch.ops.graphprune.merge_nearest


def _data(b=3, n=17, c=6, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, c, generator=g)
    size = torch.randint(1, 4, (b, n, 1), generator=g).float()
    metric = torch.randn(b, n, d, generator=g)
    score = torch.rand(b, n, generator=g)
    score[:, 5] = score[:, 6]  # a tie: the lower index ranks first
    return x, size, metric, score


def test_prune_keeps_the_best_ranked_in_rank_order():
    x, _, _, score = _data()
    out, assign, rep = PRUNE(x, score, 7, 2)
    for b in range(3):
        order = sorted(range(2, 17), key=lambda i: (-float(score[b, i]), i))[:7]
        assert rep[b].tolist() == [0, 1] + order
        torch.testing.assert_close(out[b], x[b, [0, 1] + order])
        assert [int(assign[b, i]) for i in [0, 1] + order] == list(range(9))
        assert (assign[b] == -1).sum() == 17 - 9
    assert torch.equal(PRUNE(x, score, 15, 2)[0], x)


@pytest.mark.parametrize("mode", ["size", "squeeze", "mean"])
def test_merge_nearest_definition(mode):
    x, size, metric, score = _data()
    out, new_size, assign, rep = MERGE(x, size, metric, score, 6, 1, None, mode)
    m = metric / metric.norm(dim=-1, keepdim=True)
    for b in range(3):
        order = sorted(range(1, 17), key=lambda i: (-float(score[b, i]), i))
        kept, rest = [0] + order[:6], order[6:]
        assert rep[b].tolist() == kept
        hosts = {j: 1 + int((m[b, kept[1:]] @ m[b, j]).argmax()) for j in rest}
        for slot, i in enumerate(kept):
            members = [i] + [j for j in rest if hosts[j] == slot]
            assert sorted(torch.nonzero(assign[b] == slot)[:, 0].tolist()) == sorted(members)
            sims = torch.stack([torch.tensor(1.0)] + [m[b, j] @ m[b, i] for j in members[1:]])
            if mode == "mean":  # DiffRate: plain mean; guests add similarity-weighted size
                want = x[b, members].mean(0)
                torch.testing.assert_close(new_size[b, slot, 0], (sims * size[b, members, 0]).sum())
            else:
                torch.testing.assert_close(new_size[b, slot], size[b, members].sum(0))
            if mode == "squeeze":  # TPS: softmax over similarities, the host's own being 1
                w = sims.exp()
                want = (w[:, None] * x[b, members]).sum(0) / w.sum()
            if mode == "size":
                want = (size[b, members] * x[b, members]).sum(0) / size[b, members].sum()
            torch.testing.assert_close(out[b, slot], want, atol=1e-5, rtol=1e-5)


def test_merge_nearest_keeps_padding_apart():
    x, size, metric, score = _data(b=2)
    valid = torch.ones(2, 17, dtype=torch.bool)
    valid[0, 12:] = False
    valid[1, 4:] = False
    score[~valid] = -1.0  # padding ranks last, as attention-based scores make it
    _, _, assign, _ = MERGE(x, size, metric, score, 8, 1, valid)
    for b in range(2):
        for slot in assign[b].unique():
            if slot >= 0:
                assert valid[b, assign[b] == slot].unique().numel() == 1
        assert valid[b, assign[b] < 0].logical_not().all()  # only padding is ever dropped
        pad_slots = assign[b, ~valid[b]]
        pad_slots = pad_slots[pad_slots >= 0]
        assert pad_slots.unique().numel() == pad_slots.numel()  # a padded token is kept alone or dropped, never merged


class _Ops(torch.nn.Module):
    def forward(self, x, size, metric, score):
        p = PRUNE(x, score, 9, 1)
        m = MERGE(x, size, metric, score, 7, 2, score > 0.3, "size")
        s = MERGE(x, size, metric, score, 5, 0, None, "squeeze")
        d = MERGE(x, size, metric, score, 6, 1, score > 0.5, "mean")
        return (*p, *m, *s, *d)


def test_onnx_lowerings_match_eager(tmp_path):
    args = _data()
    b = Dim("b")
    prog = torch.onnx.export(_Ops(), args, dynamo=True, dynamic_shapes=({0: b},) * 4,
                             custom_translation_table=TRANSLATIONS, opset_version=18, verbose=False)
    path = tmp_path / "select.onnx"
    prog.save(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for seed, batch in [(0, 3), (3, 1), (4, 5)]:
        args = _data(b=batch, seed=seed)
        feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), args)}
        for got, want in zip(sess.run(None, feeds), _Ops()(*args)):
            np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=1e-5)
