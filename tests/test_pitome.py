"""PiToMe's merge op against a per-sample reading of its definition, and in ONNX."""

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch.export import Dim

import graphprune  # noqa: F401
from graphprune.ops.onnx import TRANSLATIONS
from tests.reference import pitome_merge_one

PITOME = torch.ops.graphprune.pitome_merge


def _data(b=3, n=19, c=5, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, c, generator=g), torch.randint(1, 3, (b, n, 1), generator=g).float(), torch.randn(b, n, d, generator=g)


@pytest.mark.parametrize("all_pairs", [True, False], ids=["bsm", "pitome"])
@pytest.mark.parametrize("protected", [0, 1, 2])
def test_pitome_merge_definition(all_pairs, protected):
    x, size, metric = _data()
    out, new_size, assign, rep = PITOME(x, size, metric, 5, protected, 0.5, all_pairs)
    assert out.shape[1] == 19 - 5
    for b in range(3):
        rx, rs = pitome_merge_one(x[b], size[b], metric[b], 5, protected, 0.5, all_pairs)
        torch.testing.assert_close(out[b], rx, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(new_size[b], rs)
        for j in range(out.shape[1]):
            assert assign[b, rep[b, j]] == j
            torch.testing.assert_close(new_size[b, j, 0], size[b, assign[b] == j, 0].sum())


def test_pitome_margin_changes_which_tokens_merge():
    x, size, metric = _data()
    low = PITOME(x, size, metric, 5, 1, 0.0, False)[2]
    high = PITOME(x, size, metric, 5, 1, 0.9, False)[2]
    assert not torch.equal(low, high)


class _Ops(torch.nn.Module):
    def forward(self, x, size, metric, valid):
        return (*PITOME(x, size, metric, 5, 1, 0.4, True), *PITOME(x, size, metric, 4, 2, 0.6, False, valid))


def test_pitome_onnx_matches_eager(tmp_path):
    x, size, metric = _data()
    valid = torch.ones(3, 19, dtype=torch.bool)
    valid[1, 12:] = False
    b = Dim("b")
    prog = torch.onnx.export(_Ops(), (x, size, metric, valid), dynamo=True, dynamic_shapes=({0: b},) * 4,
                             custom_translation_table=TRANSLATIONS, opset_version=18, verbose=False)
    path = tmp_path / "pitome.onnx"
    prog.save(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for seed, batch in [(0, 3), (2, 1), (3, 4)]:
        x, size, metric = _data(b=batch, seed=seed)
        valid = torch.ones(batch, 19, dtype=torch.bool)
        valid[-1, 10:] = False
        args = (x, size, metric, valid)
        feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), args)}
        for got, want in zip(sess.run(None, feeds), _Ops()(*args)):
            np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=1e-5)
    assert math.isfinite(float(np.abs(got).max()))
