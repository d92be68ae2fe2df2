"""The public extension point: a cache policy written outside the package, registered and run on every family."""

from __future__ import annotations

import importlib.util
import textwrap

import pytest
import torch
from transformers import (
    DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM,
    Qwen3Config, Qwen3ForCausalLM,
)

import graphprune
from graphprune.recipes import RECIPES

KEY_NORM = textwrap.dedent('''
    from dataclasses import dataclass

    import graphprune
    from graphprune.kv import CachePolicy


    @graphprune.register
    @dataclass
    class KeyNorm(CachePolicy):
        name = "outside_key_norm"
        summary = "keep the keys of smallest norm"
        paper = "(a test policy)"

        def score(self, view):
            return -view.keys.norm(dim=-1)
''')

FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
            "qwen3": (Qwen3Config, Qwen3ForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}


@pytest.fixture(scope="module")
def key_norm(tmp_path_factory):
    """The policy module, written to a folder outside the repository and imported from there."""
    path = tmp_path_factory.mktemp("user_code") / "key_norm_policy.py"
    path.write_text(KEY_NORM)
    spec = importlib.util.spec_from_file_location("key_norm_policy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module.KeyNorm.name
    RECIPES.pop(module.KeyNorm.name)


def family_model(family: str):
    torch.manual_seed(0)
    config, cls = FAMILIES[family]
    extra = {"head_dim": 16} if family == "qwen3" else {"sliding_window": None} if family == "mistral" else {}
    model = cls(config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=1, **extra)).eval()
    for layer in model.model.layers:  # Qwen3 normalises keys: random gains, or every key would have the same norm
        if hasattr(layer.self_attn, "k_norm"):
            torch.nn.init.uniform_(layer.self_attn.k_norm.weight, 0.5, 1.5)
    return model


def kept_positions(layer) -> list[list[set[int]]]:
    st = layer.storage
    return [[set(st.pos[b, h][st.valid[b, h]].tolist()) for h in range(st.pos.shape[1])] for b in range(st.pos.shape[0])]


def expected_positions(keys: torch.Tensor, real: torch.Tensor, pos: torch.Tensor, budget: int) -> list[list[set[int]]]:
    """Top-``budget`` real tokens by -|key| per KV head, from the unmodified model's full cache."""
    out = []
    for b in range(keys.shape[0]):
        idx = real[b].nonzero().flatten()
        norms = keys[b][:, idx].norm(dim=-1)  # (Hkv, n_real)
        out.append([set(pos[b, idx[norms[h].argsort()[:budget]]].tolist()) for h in range(keys.shape[1])])
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_outside_key_norm_policy_keeps_exactly_its_top_budget(key_norm, family):
    model = family_model(family)
    fast = graphprune.optimize(model, recipe=key_norm, budget=64)
    g = torch.Generator().manual_seed(3)
    # distinct tokens: RoPE keeps a key's norm, so a repeated token would tie with itself
    tokens = torch.stack([torch.randperm(254, generator=g)[:102] + 2 for _ in range(2)])
    ids, steps = tokens[:, :96].clone(), tokens[:, 96:]
    mask = torch.ones_like(ids)
    ids[1, :20], mask[1, :20] = 0, 0  # left padding: 96 and 76 real tokens
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=pos, use_cache=True)
        out = fast(ids, attention_mask=mask, position_ids=pos, use_cache=True)
        for layer in range(2):  # the prompt pass is exact, so every layer's keys are the full model's
            expected = expected_positions(full.cache.layers[layer].keys, mask.bool(), pos, 64)
            assert kept_positions(out.cache.layers[layer]) == expected
        cache, ref = out.cache, full.cache
        for t in range(steps.shape[1]):  # decoding: layer 0's keys depend on the token and position only
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            pos = torch.cat([pos, pos[:, -1:] + 1], 1)
            out = fast(steps[:, t:t + 1], attention_mask=mask, position_ids=pos[:, -1:], cache=cache, use_cache=True)
            model(steps[:, t:t + 1], attention_mask=mask, position_ids=pos[:, -1:], cache=ref, use_cache=True)
            expected = expected_positions(ref.layers[0].keys, mask.bool(), pos, 64)
            assert kept_positions(cache.layers[0]) == expected, f"step {t}"
    assert isinstance(ref, DynamicCache) and fast.report.recipe == key_norm


def test_a_policy_needs_a_score(key_norm):
    from graphprune.kv import CachePolicy

    assert graphprune.list_recipes("cache").count(key_norm) == 1
    with pytest.raises(NotImplementedError, match="must define score"):
        CachePolicy().score(None)
