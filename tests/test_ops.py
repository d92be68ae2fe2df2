"""The token ops: merge invariants, batch independence, ONNX lowering with repeated destinations."""

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch.export import Dim

import graphprune  # noqa: F401
from graphprune.ops.evit import evit_keep_count
from graphprune.ops.onnx import TRANSLATIONS
from graphprune.report import count_flops

TOME = torch.ops.graphprune.tome_merge
EVIT = torch.ops.graphprune.evit_select
MERGE = torch.ops.graphprune.merge_nearest
PITOME = torch.ops.graphprune.pitome_merge
PRUNE = torch.ops.graphprune.prune


def _inputs(b=3, n=33, c=8, d=4, seed=0, duplicate=True):  # noqa: PLR0913
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, c, generator=g)
    size = torch.randint(1, 4, (b, n, 1), generator=g).float()
    metric = torch.randn(b, n, d, generator=g)
    if duplicate:  # identical keys: many A tokens pick the same B destination
        metric[:, 4:20] = metric[:, 3:4]
    return x, size, metric


@pytest.mark.parametrize("protected", [0, 1, 2, 5])
def test_tome_merge_preserves_mass(protected):
    x, size, metric = _inputs()
    out, new_size, assign, rep = TOME(x, size, metric, 10, protected)
    assert out.shape == (3, 23, 8) and new_size.shape == (3, 23, 1)
    torch.testing.assert_close(new_size.sum(1), size.sum(1))  # sizes add up
    torch.testing.assert_close((out * new_size).sum(1), (x * size).sum(1), rtol=1e-5, atol=1e-4)  # Σ size·x kept
    torch.testing.assert_close(out[:, :protected], x[:, :protected])  # protected tokens untouched, in place
    torch.testing.assert_close(new_size[:, :protected], size[:, :protected])
    # token maps: every output token is the size-weighted mean of the inputs assigned to it
    for b in range(3):
        for j in range(out.shape[1]):
            members = assign[b] == j
            assert members.any() and assign[b, rep[b, j]] == j
            torch.testing.assert_close(new_size[b, j, 0], size[b, members, 0].sum())
            torch.testing.assert_close(out[b, j] * new_size[b, j], (x[b, members] * size[b, members]).sum(0), rtol=1e-5, atol=1e-4)


def test_tome_merge_never_mixes_padding_with_real_tokens():
    x, size, metric = _inputs(b=2, n=21)
    valid = torch.ones(2, 21, dtype=torch.bool)
    valid[0, 13:] = False
    valid[1, 6:] = False
    metric[:, 12:15] = metric[:, 11:12]  # a padded key identical to a real one: still kept apart
    out, new_size, assign, rep = TOME(x, size, metric, 6, 1, valid)
    for b in range(2):
        for j in range(out.shape[1]):
            assert valid[b, assign[b] == j].unique().numel() == 1


class _Tome(torch.nn.Module):
    def forward(self, x, size, metric, valid):
        return TOME(x, size, metric, 2, 1, valid)


def test_tome_merge_keeps_the_class_token_where_padding_leaves_no_pair(tmp_path):
    """A row with one padding token of five (A = 0, 2, 4; B = 1, 3) has one pair that may merge (2 with a real B) but
    the batch merges two: the second merge takes the padding token into a real one, never the protected class token
    (its row is -inf, below the pairs that may not merge), which stays at output 0. ONNX Runtime and OpenVINO, each
    with its own rules for equal values and infinities, give the same maps, also with a symbolic token count."""
    g = torch.Generator().manual_seed(0)
    x, metric = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 3, generator=g)
    size = torch.ones(2, 5, 1)
    valid = torch.tensor([[True, True, True, True, False], [True, True, False, False, False]])
    out, _, assign, rep = TOME(x, size, metric, 2, 1, valid)
    assert rep[:, 0].tolist() == [0, 0] and assign[:, 0].tolist() == [0, 0]  # the class token alone, in place
    assert assign[0, 4] == assign[0, 1] and torch.equal(out[:, 0], x[:, 0])  # (row 0: padding into the first B)
    n = Dim("n", min=4, max=64)
    prog = torch.onnx.export(_Tome(), (x, size, metric, valid), dynamo=True, custom_translation_table=TRANSLATIONS,
                             dynamic_shapes=({1: n}, {1: n}, {1: n}, {1: n}), opset_version=18, verbose=False)
    path = tmp_path / "tome.onnx"
    prog.save(str(path))
    runs = [lambda *a: ort.InferenceSession(str(path)).run(None, {i.name: t.numpy() for i, t in zip(
        ort.InferenceSession(str(path)).get_inputs(), a)})]
    try:
        import openvino as ov
    except ImportError:
        pass
    else:
        compiled = ov.Core().compile_model(ov.convert_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        runs.append(lambda *a: [compiled([t.numpy() for t in a])[o] for o in compiled.outputs])
    for run in runs:
        for n_tokens in (5, 9):
            big = torch.randn(2, n_tokens, 4, generator=g), torch.ones(2, n_tokens, 1), torch.randn(2, n_tokens, 3, generator=g)
            mask = torch.arange(n_tokens) < torch.tensor([[n_tokens - 1], [2]])
            args = (x, size, metric, valid) if n_tokens == 5 else (*big, mask)
            for got, want in zip(run(*args), TOME(*args[:3], 2, 1, args[3])):
                np.testing.assert_allclose(got, want.numpy(), atol=1e-5)


def test_tome_merge_caps_r_and_r0_is_identity():
    x, size, metric = _inputs(n=9)
    out, s, _, _ = TOME(x, size, metric, 100, 1)
    assert out.shape[1] == 9 - (9 - 1) // 2
    out, s, assign, rep = TOME(x, size, metric, 0, 1)
    assert torch.equal(out, x) and torch.equal(s, size)
    assert torch.equal(assign, torch.arange(9).expand(3, 9)) and torch.equal(rep, assign)


def test_tome_merge_batch_independent():
    x, size, metric = _inputs()
    out = TOME(x, size, metric, 7, 1)[0]
    x2, size2, metric2 = x.clone(), size.clone(), metric.clone()
    x2[1:] = torch.randn_like(x2[1:])
    metric2[1:] = torch.randn_like(metric2[1:])
    out2 = TOME(x2, size2, metric2, 7, 1)[0]
    torch.testing.assert_close(out2[0], out[0])
    single = TOME(x[:1], size[:1], metric[:1], 7, 1)[0]
    torch.testing.assert_close(single[0], out[0])


def test_evit_select_definition():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 11, 4, generator=g)
    score = torch.rand(2, 11, generator=g)
    out, assign, rep = EVIT(x, score, 0.5, 1)
    k = evit_keep_count(11, 0.5, 1)
    assert k == math.ceil(0.5 * 10) and out.shape == (2, 1 + k + 1, 4)
    for b in range(2):
        order = torch.argsort(score[b, 1:], descending=True)
        torch.testing.assert_close(out[b, 0], x[b, 0])
        torch.testing.assert_close(out[b, 1 : 1 + k], x[b, 1 + order[:k]])
        dropped = order[k:]
        torch.testing.assert_close(out[b, -1], (score[b, 1 + dropped, None] * x[b, 1 + dropped]).sum(0))
        # maps: kept tokens point at their slot, dropped ones at the fused token, which stands for the best dropped
        assert torch.equal(assign[b, 1 + order[:k]], torch.arange(1, 1 + k)) and assign[b, 0] == 0
        assert (assign[b, 1 + dropped] == k + 1).all() and rep[b, -1] == 1 + dropped[0]
        assert torch.equal(rep[b, : k + 1], torch.cat([torch.zeros(1, dtype=torch.long), 1 + order[:k]]))
    assert torch.equal(EVIT(x, score, 1.0, 1)[0], x)  # nothing dropped: unchanged, no fused token


def test_flops_of_the_token_ops_equal_a_hand_count():
    """The custom ops' own cost (report.py): similarity products, metric normalisation, weighted sums."""
    b, n, c, d, p = 2, 33, 8, 4, 1
    x, size, metric = _inputs(b, n, c, d)
    score = torch.rand(b, n)
    t = n - p  # unprotected tokens
    merge = 2 * n * c  # weighted sum of every token into its slot
    cases = [
        (lambda: TOME(x, size, metric, 10, p), 2 * 17 * 16 * d + 2 * n * d + merge),  # A (17) × B (16)
        (lambda: MERGE(x, size, metric, score, 20, p), 2 * (t - 20) * 20 * d + 2 * n * d + merge),  # pruned × kept
        (lambda: PITOME(x, size, metric, 5, p, 0.5, True), 2 * t * t * d + 2 * t * d + 2 * 16 * 16 * d + merge),
        (lambda: PITOME(x, size, metric, 5, p, 0.5, False), 2 * t * t * d + 2 * t * d + 2 * 5 * 5 * d + merge),
        (lambda: EVIT(x, score, 0.5, p), 2 * t * c),  # the fused token
        (lambda: PRUNE(x, score, 10, p), 0),  # selection only
    ]
    for op, per_sample in cases:
        assert count_flops(op, ()) == b * per_sample
    nothing = [lambda: TOME(x, size, metric, 0, p), lambda: MERGE(x, size, metric, score, t, p),
               lambda: PITOME(x, size, metric, 0, p, 0.5, True), lambda: EVIT(x, score, 1.0, p)]
    for op in nothing:  # an op that reduces nothing returns its input and costs nothing
        assert count_flops(op, ()) == 0


class _Ops(torch.nn.Module):
    def forward(self, x, size, metric, score):
        y, s, a, r = TOME(x, size, metric, 10, 2)
        y2, s2, a2, r2 = TOME(y, s, y[..., :4], 6, 2, score[:, : y.shape[1]] > 0.2)
        e, a3, r3 = EVIT(y2, score[:, : y2.shape[1]], 0.6, 2)
        return y, s, a, r, y2, s2, a2, r2, e, a3, r3


def test_onnx_lowering_matches_eager_with_repeated_destinations(tmp_path):
    x, size, metric = _inputs()
    score = torch.rand(3, 33)
    b = Dim("b")
    prog = torch.onnx.export(_Ops(), (x, size, metric, score), dynamo=True, dynamic_shapes=({0: b},) * 4,
                             custom_translation_table=TRANSLATIONS, opset_version=18, verbose=False)
    path = tmp_path / "ops.onnx"
    prog.save(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for seed, batch in [(0, 3), (5, 1), (9, 4)]:  # other batch sizes too
        x, size, metric = _inputs(b=batch, seed=seed)
        if seed == 5:  # zero keys of protected tokens (zero-initialised cls/dist): NaN scores must stay masked
            metric[:, :2] = 0
        score = torch.rand(batch, 33)
        feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), (x, size, metric, score))}
        for got, want in zip(sess.run(None, feeds), _Ops()(x, size, metric, score)):
            np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=1e-5)
            assert got.dtype == want.numpy().dtype
    nodes = __import__("onnx").load(str(path)).graph.node
    # merges add the moved tokens into their destinations with ScatterElements(reduction="add") (O(k·C); repeated
    # destinations sum, as checked above), not a one-hot assignment MatMul (O(N·k·C))
    assert [a for n in nodes if n.op_type == "ScatterElements" for a in n.attribute if a.name == "reduction" and a.s == b"add"]
    assert not [n for n in nodes if n.op_type == "OneHot"]
