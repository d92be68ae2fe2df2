"""Decoder LLMs with a fixed cache budget export to ONNX (prefill + static decode step) and generate in ORT."""

from __future__ import annotations

import pytest
import torch

import graphprune
from graphprune.errors import GraphPruneError
from graphprune.exporters.decoder_onnx import OnnxDecoder
from tests.test_kv import CACHE_RECIPES, SMALL, greedy, tiny


# (h2o and scissorhands export as tova does, in the slow run for time: .ci/run runs it)
@pytest.mark.parametrize("recipe", [r if r not in ("h2o", "scissorhands") else pytest.param(r, marks=pytest.mark.slow)
                                    for r in CACHE_RECIPES])
def test_onnx_generation_matches_eager_token_for_token(recipe, tmp_path):
    model = tiny("qwen2" if recipe == "tova" else "llama", seed=4)
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(2, 101, (3, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = mask[2, :9] = 0
    ids[mask == 0] = 0
    runner = graphprune.optimize(model, recipe, target="onnx", output=tmp_path / "llm", example_inputs=ids,
                                 max_new_tokens=12, budget=10, **SMALL.get(recipe, {}))
    assert sorted(p.name for p in (tmp_path / "llm").iterdir()) == [
        "decode.onnx", "decode.onnx.data", "decoder.json", "prefill.onnx", "prefill.onnx.data"]
    fast = graphprune.optimize(model, recipe, budget=10, **SMALL.get(recipe, {}))
    with torch.no_grad():
        expected = greedy(fast, ids, mask, n=12)
    got = OnnxDecoder(tmp_path / "llm").generate(ids, mask, 12)[:, :expected.shape[1]]  # generate() may stop early
    assert torch.equal(got, expected)
    assert runner.meta["capacities"] == ([10] * 3 if recipe != "pyramidkv" else runner.meta["capacities"])


def test_onnx_export_refuses_what_it_cannot_do(tmp_path):
    model = tiny()
    with pytest.raises(GraphPruneError, match="fixed budget"):
        graphprune.optimize(model, "h2o", target="onnx", output=tmp_path / "x", budget=0.5)
    for recipe, options in [("kivi", {}), ("lazyllm", {}), ("rocketkv", {"budget": 12}), ("gear", {}), ("palu", {}),
                            ("qhitter", {}), ("kvquant", {"bits": 16})]:  # caches that change shape as they work
        with pytest.raises(GraphPruneError, match="no static-shape decode step"):
            graphprune.optimize(model, recipe, target="onnx", output=tmp_path / "x", **options)
    with pytest.raises(GraphPruneError, match="needs output"):
        graphprune.optimize(model, "h2o", target="onnx", budget=8)
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())
