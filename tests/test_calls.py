"""The optimized model takes the calls the original takes: positional, keyword, ``**tokenizer(...)``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, ViTConfig, ViTModel

import graphprune
from graphprune.errors import GraphPruneError


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64)).eval()
    ids = torch.randint(1, 100, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    return model, ids, mask


@pytest.fixture(scope="module")
def vit():
    """A tiny HF ViT, an image batch, and the model optimized with ToMe from positional example inputs."""
    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8), add_pooling_layer=False).eval()
    x = torch.randn(2, 3, 32, 32)
    fast = graphprune.optimize(vit, "tome", r=2, example_inputs=(x,))
    return vit, x, fast


def test_an_image_model_captured_positionally_takes_keywords(vit):
    vit, x, fast = vit
    out = fast(pixel_values=x)
    assert type(out) is type(vit(x))  # the original's output type
    assert torch.equal(out.last_hidden_state, fast(x).last_hidden_state)
    zero = graphprune.optimize(vit, "tome", r=0, example_inputs=(x,))
    assert (zero(pixel_values=x).last_hidden_state - vit(pixel_values=x).last_hidden_state).abs().max() < 1e-5


def test_a_text_model_takes_a_tokenizers_output(bert):
    """``fast(**tokenizer(texts))``: token_type_ids of zeros are what BERT assumes without them (checked once on the
    original), so they are dropped; other values, missing inputs and flags that change the output are refused."""
    model, ids, mask = bert
    fast = graphprune.optimize(model, "tome", r=2, example_inputs=(ids, mask))
    captured = fast(ids, mask).last_hidden_state
    for call in (dict(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)),
                 dict(input_ids=ids, attention_mask=mask), dict(attention_mask=mask, input_ids=ids, return_dict=None)):
        assert torch.equal(fast(**call).last_hidden_state, captured)
    assert torch.equal(fast(ids, attention_mask=mask).last_hidden_state, captured)
    with pytest.raises(GraphPruneError, match="captured without token_type_ids.*example_inputs that include it"):
        fast(input_ids=ids, attention_mask=mask, token_type_ids=torch.ones_like(ids))
    with pytest.raises(GraphPruneError, match="pass attention_mask"):
        fast(input_ids=ids)
    with pytest.raises(GraphPruneError, match="output_attentions=True would change that"):
        fast(input_ids=ids, attention_mask=mask, output_attentions=True)
    with pytest.raises(GraphPruneError, match="does not take this call"):
        fast(ids, mask, input_ids=ids)


def test_example_inputs_by_name_capture_token_type_ids(bert):
    model, ids, mask = bert
    segments = (torch.arange(12) > 5).long().expand(2, 12)
    fast = graphprune.optimize(model, "tome", r=0, example_inputs=dict(input_ids=ids, token_type_ids=segments,
                                                                       attention_mask=mask))
    got = fast(input_ids=ids, attention_mask=mask, token_type_ids=segments).last_hidden_state
    expected = model(input_ids=ids, attention_mask=mask, token_type_ids=segments).last_hidden_state
    assert (got - expected).abs().max() < 1e-5
    with pytest.raises(GraphPruneError, match="first parameters of the model's forward in order; add attention_mask"):
        graphprune.optimize(model, "tome", r=2, example_inputs=dict(input_ids=ids, token_type_ids=segments))
    with pytest.raises(GraphPruneError, match="does not take"):
        graphprune.optimize(model, "tome", r=2, example_inputs=dict(input_ids=ids, pixel_values=ids))


def test_torch_compile_traces_one_graph_and_matches(vit):
    """torch.compile(fast, fullgraph=True): no graph break on graphprune's ops, the same outputs, keyword calls too."""
    _, x, fast = vit
    compiled = torch.compile(fast, fullgraph=True)
    assert (compiled(x).last_hidden_state - fast(x).last_hidden_state).abs().max() <= 1e-4
    assert (compiled(pixel_values=x).last_hidden_state - fast(x).last_hidden_state).abs().max() <= 1e-4


def test_text_model_buckets_serve_any_length_up_to_the_largest(bert):
    """lengths=[16, 32] with a recipe that fixes token sets when optimized (ToMe's kth split): one graph per bucket; a
    call pads to the next bucket and per-token outputs are cut back; at zero reduction every length equals the
    unmodified model on the real tokens; longer calls are refused."""
    model, ids, mask = bert
    fast = graphprune.optimize(model, "tome", r=0, split="kth", example_inputs={"input_ids": ids, "attention_mask": mask},
                               lengths=[32, 16])
    assert fast.lengths == [16, 32]
    g = torch.Generator().manual_seed(3)
    for n in (5, 16, 20, 32):
        x = torch.randint(1, 100, (3, n), generator=g)
        m = torch.ones_like(x)
        m[1, n // 2:] = 0  # (a padded row too)
        with torch.no_grad():
            expected = model(input_ids=x, attention_mask=m)
        got = fast(input_ids=x, attention_mask=m)
        assert got.last_hidden_state.shape == (3, n, 32)
        real = m.bool()
        assert (got.last_hidden_state - expected.last_hidden_state)[real].abs().max() <= 1e-5
        assert (got.pooler_output - expected.pooler_output).abs().max() <= 1e-5
        assert torch.equal(fast(x, m).last_hidden_state, got.last_hidden_state)  # positional calls alike
    with pytest.raises(GraphPruneError, match="lengths up to 32"):
        fast(input_ids=torch.ones(1, 40, dtype=torch.long), attention_mask=torch.ones(1, 40, dtype=torch.long))
    merged = graphprune.optimize(model, "evit", keep=0.5, locations=[1], lengths=[16, 32],
                                 example_inputs={"input_ids": ids, "attention_mask": mask})
    assert merged.lengths == [16, 32]  # (EViT's kept count is fixed when optimized: buckets)
    assert merged(input_ids=ids[:, :10], attention_mask=mask[:, :10]).last_hidden_state.shape == (2, 10, 32)
    with pytest.raises(GraphPruneError, match="symbolic sequence length, which 'evit' cannot give"):
        graphprune.optimize(model, "evit", keep=0.5, example_inputs=(ids, mask), lengths=[16], target="onnx",
                            output="x")
    assert not Path("x").exists()


def test_tome_serves_any_length_from_one_graph_with_a_symbolic_length(bert, tmp_path):
    """ToMe's merge works out how many tokens it merges from the tokens it gets, so lengths=[16, 32] captures one graph
    with a symbolic sequence length (at 32): every length from 2 to 32 equals the model optimized at that length, at
    zero reduction the unmodified model; other lengths are refused; it compiles in one graph and saves as a .pt2 that
    keeps the symbolic length."""
    model, ids, mask = bert
    example = {"input_ids": ids, "attention_mask": mask}
    fast = graphprune.optimize(model, "tome", r=3, example_inputs=example, lengths=[16, 32])
    zero = graphprune.optimize(model, "tome", r=0, example_inputs=example, lengths=[16, 32])
    assert not hasattr(fast, "lengths") and fast.max_tokens == 32  # one graph, not buckets
    assert fast.report.tokens_per_block == [32, 29]  # counted at the longest length
    g = torch.Generator().manual_seed(5)
    for n in (2, 5, 12, 21, 32):
        x = torch.randint(1, 100, (3, n), generator=g)
        m = torch.ones_like(x)
        m[1, n // 2:] = 0
        got = fast(input_ids=x, attention_mask=m)
        at_n = graphprune.optimize(model, "tome", r=3, example_inputs=(x, m))(x, m)
        assert got.last_hidden_state.shape == (3, n, 32)
        assert (got.last_hidden_state - at_n.last_hidden_state).abs().max() <= 1e-6
        assert (got.pooler_output - at_n.pooler_output).abs().max() <= 1e-6
        with torch.no_grad():
            plain = model(input_ids=x, attention_mask=m)
        real = m.bool()
        assert (zero(x, m).last_hidden_state - plain.last_hidden_state)[real].abs().max() <= 1e-5
    assert (got.last_hidden_state - zero(x, m).last_hidden_state).abs().max() > 1e-3  # (it does merge)
    for n in (1, 33):
        with pytest.raises(GraphPruneError, match="2 to 32 tokens"):
            fast(input_ids=torch.ones(1, n, dtype=torch.long), attention_mask=torch.ones(1, n, dtype=torch.long))
    x = torch.randint(1, 100, (2, 20), generator=g)
    m = torch.ones_like(x)
    compiled = torch.compile(fast, fullgraph=True)
    assert (compiled(x, m).last_hidden_state - fast(x, m).last_hidden_state).abs().max() <= 1e-5
    loaded = graphprune.load(fast.save(tmp_path / "tome.pt2"))
    assert (loaded(x, m).last_hidden_state - fast(x, m).last_hidden_state).abs().max() <= 1e-5


@pytest.mark.parametrize("target", ["onnx", "trt", "openvino", "triton"])
def test_tome_exports_one_graph_with_a_symbolic_length(bert, tmp_path, target):
    """lengths=[16, 32] with ToMe and an exported target: one graph whose sequence length is symbolic (the merges'
    ONNX lowering works out r from the tokens it gets), checked at 2, 17 and 32 tokens before it is written; it equals
    the model optimized at each length from 2 to 32, refuses other lengths, and the deployment files say the length
    is dynamic (TensorRT's profile from 2 to 32 tokens, Triton's dims -1)."""
    model, ids, mask = bert
    example = {"input_ids": ids, "attention_mask": mask}
    out = tmp_path / ("repo/bert" if target == "triton" else "out")
    runner = graphprune.optimize(model, "tome", r=3, example_inputs=example, lengths=[16, 32], target=target,
                                 output=out)
    fast = graphprune.optimize(model, "tome", r=3, example_inputs=example, lengths=[16, 32])
    assert runner.report.parity["onnx"] <= 1e-4 and runner.max_tokens == 32
    session = runner.session if target != "openvino" else graphprune.OnnxModel(out / "model.onnx").session
    assert [i.shape[1] for i in session.get_inputs()] == [session.get_inputs()[0].shape[1]] * 2
    assert not isinstance(session.get_inputs()[0].shape[1], int)  # (symbolic in the graph)
    g = torch.Generator().manual_seed(7)
    for n in (2, 3, 5, 12, 21, 32):
        x = torch.randint(1, 100, (3, n), generator=g)
        m = torch.ones_like(x)
        m[1, n // 2:] = 0
        got, expected = runner(x, m), fast(x, m)
        assert got.last_hidden_state.shape == (3, n, 32)
        assert (got.last_hidden_state - expected.last_hidden_state).abs().max() <= 1e-4
        assert (got.pooler_output - expected.pooler_output).abs().max() <= 1e-4
    with pytest.raises(GraphPruneError, match="2 to 32 tokens"):
        runner(torch.ones(1, 33, dtype=torch.long), torch.ones(1, 33, dtype=torch.long))
    if target == "trt":
        profile = json.loads((out / "profile.json").read_text())
        assert [profile[name]["min"][1] for name in profile] == [2, 2]
        assert [profile[name]["max"][1] for name in profile] == [32, 32]
    if target == "triton":
        config = (out / "config.pbtxt").read_text()
        assert config.count("dims: [ -1 ]") == 2 and "dims: [ -1, 32 ]" in config
