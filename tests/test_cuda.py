"""On a GPU (skipped without one; CI has none): the recipes run on CUDA tensors and agree with the CPU. Encoder recipes
give the CPU's outputs, cache policies and visual recipes the CPU's greedy tokens (float32, TF32 off)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

import graphprune
from tests.conftest import images, tiny
from tests.test_kv import SMALL, greedy, left_padded
from tests.test_kv import tiny as tiny_lm
from tests.test_prompt import lm  # noqa: F401 (a fixture)

DEVICE = os.environ.get("GRAPHPRUNE_TEST_DEVICE", "cuda")  # (=cpu runs these tests' code paths without a GPU)
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")

ENCODER = {"tome": {"r": 6}, "evit": {"keep": 0.7}, "ats": {"capacity": 0.6}, "turbo": {"r": 6, "min_tokens": 8},
           "pitome": {"ratio": 0.9}, "atc": {"keep": 0.7}, "diffrate": {"prune": [0.9] * 4, "merge": [0.8] * 4},
           "evo_vit": {"keep": 0.6}, "ppt": {"r": 6}, "tps": {"keep": 0.7}, "zero_tprune": {"keep": 0.7}}
CACHE = {"streaming_llm": {"budget": 12}, "h2o": {"budget": 12}, "tova": {"budget": 12}, "snapkv": {"budget": 12},
         "pyramidkv": {"budget": 12}, "scissorhands": {"budget": 12}, "kivi": {"bits": 4}, "gear": {"bits": 4},
         "kvquant": {"bits": 4}, "palu": {"ratio": 0.5, "align": 8}, "palu 3-bit": {"ratio": 0.5, "align": 8, "bits": 3},
         "qhitter": {},
         "rocketkv": {"budget": 12, "window": 4, "kernel": 3, "new_tokens": 8}}


@pytest.fixture(autouse=True)
def _exact_matmuls():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("recipe", list(ENCODER))
def test_encoder_recipes_on_cuda_equal_the_cpu(recipe):
    model, x = tiny("vit_tiny_patch16_224"), images(3)
    on_cpu = graphprune.optimize(model, recipe, example_inputs=(x,), **ENCODER[recipe])
    on_gpu = graphprune.optimize(copy.deepcopy(model).to(DEVICE), recipe, example_inputs=(x.to(DEVICE),), **ENCODER[recipe])
    with torch.no_grad():
        expected, got = on_cpu(x), on_gpu(x.to(DEVICE))
    assert got.device.type == DEVICE
    torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("recipe", list(CACHE))
def test_cache_policies_on_cuda_generate_the_cpus_tokens(recipe):
    _generates_the_cpus_tokens(tiny_lm("llama"), recipe)


@pytest.mark.parametrize("recipe", ["snapkv", "streaming_llm", "tova", "kivi", "rocketkv"])
def test_cache_policies_on_cuda_respect_gemma3s_sliding_layers(recipe):
    """Gemma 3 (sliding-window layers around a global one): the CPU's greedy tokens on CUDA."""
    _generates_the_cpus_tokens(tiny_lm("gemma3"), recipe)


def _generates_the_cpus_tokens(model, label):
    recipe = label.split()[0]
    ids, mask, _ = left_padded()
    options = {**SMALL.get(recipe, {}), **CACHE[label]}
    expected = greedy(graphprune.optimize(model, recipe, **options), ids, mask)
    fast = graphprune.optimize(copy.deepcopy(model).to(DEVICE), recipe, **options)
    assert torch.equal(greedy(fast, ids.to(DEVICE), mask.to(DEVICE)).cpu(), expected)


@pytest.mark.parametrize("recipe, options", [("fastv", {"layer": 2, "ratio": 0.5}), ("divprune", {"keep": 0.3}),
                                             ("pyramiddrop", {"layers": [2], "keep": 0.5}),
                                             ("turbo", {"r": 2, "alpha": 5.0}), (["fastv", "snapkv"], {"budget": 24, "window": 4})])
def test_visual_recipes_on_cuda_generate_the_cpus_tokens(recipe, options):
    from tests.test_vlm import tiny_vlm

    vlm = tiny_vlm("llava")
    ids, images_ = vlm.prompt(4, 6), vlm.images(1)
    kw = vlm.inputs(ids[None], images_)
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    expected = graphprune.optimize(vlm.model, recipe, **options).generate(**kw, **gen)
    fast = graphprune.optimize(copy.deepcopy(vlm.model).to(DEVICE), recipe, **options)
    got = fast.generate(**{k: v.to(DEVICE) for k, v in kw.items()}, **gen)
    assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("use_rand", [False, True])
def test_tomesd_on_cuda_equals_the_cpu(use_rand):
    """A reduced UNet on CUDA gives the CPU's output: top-left cells, or the CPU's random cells handed to the GPU."""
    pytest.importorskip("diffusers")
    from graphprune.diffusion.denoiser import Draws
    from tests.test_diffusion import _unet_inputs, unet

    model = unet.__wrapped__()
    inputs = _unet_inputs()
    on_cpu = graphprune.optimize(model, "tomesd", ratio=0.5, seed=0, use_rand=use_rand, merge_mlp=True)
    on_gpu = graphprune.optimize(copy.deepcopy(model).to(DEVICE), "tomesd", ratio=0.5, seed=0, use_rand=use_rand,
                                 merge_mlp=True)
    with torch.no_grad():
        draws = Draws(torch.Generator().manual_seed(0) if use_rand else None)
        expected = on_cpu.call((), dict(inputs), draws).sample
        given = Draws(given=[cells for _, cells in draws.log]) if use_rand else None
        got = on_gpu.call((), {k: v.to(DEVICE) for k, v in inputs.items()}, given).sample
    assert got.device.type == DEVICE
    torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["dit", "pixart", "sd3", "flux"])
def test_tomesd_transformer_denoisers_on_cuda_equal_the_cpu(kind):
    """A reduced DiT, PixArt, SD3 and Flux (top-left cells: no draw) on CUDA gives the CPU's output."""
    pytest.importorskip("diffusers")
    from tests.test_diffusion import _dit_inputs, _flux, _pixart, _sd3, dit

    model, inputs = {"dit": lambda: (dit.__wrapped__(), _dit_inputs()), "pixart": _pixart, "sd3": _sd3,
                     "flux": _flux}[kind]()
    on_cpu = graphprune.optimize(model, "tomesd", ratio=0.5, use_rand=False)
    on_gpu = graphprune.optimize(copy.deepcopy(model).to(DEVICE), "tomesd", ratio=0.5, use_rand=False)
    to = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in inputs.items()}
    with torch.no_grad():
        expected, got = on_cpu(**inputs).sample, on_gpu(**to).sample
    assert got.device.type == DEVICE
    assert (expected - model(**inputs).sample).abs().max() > 1e-3  # (the merge changes the output)
    torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-4)


def test_prompt_compression_on_cuda_equals_the_cpu(lm):
    """LLMLingua and LongLLMLingua with the compressor on CUDA keep the tokens they keep on the CPU; the llmlingua
    recipe's generate on CUDA gives the CPU's tokens."""
    from tests.test_prompt import _doc

    model, tokenizer = lm
    gpu = copy.deepcopy(model).to(DEVICE)
    docs = [_doc(40, 80), _doc(41, 60)]
    for method, extra in (("llmlingua", {}), ("longllmlingua", {"question": "w3 w5 ?", "use_context_filter": False})):
        kw = dict(tokenizer=tokenizer, rate=0.5, iterative_size=30, method=method, **extra)
        assert (graphprune.compress_prompt(docs, compressor=gpu, **kw)["compressed_prompt"]
                == graphprune.compress_prompt(docs, compressor=model, **kw)["compressed_prompt"])
    tokenizer.padding_side = "left"
    enc = tokenizer(docs, return_tensors="pt", padding=True)
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = graphprune.optimize(model, "llmlingua", rate=0.5, tokenizer=tokenizer, iterative_size=30).generate(
        enc["input_ids"], attention_mask=enc["attention_mask"], **gen)
    got = graphprune.optimize(gpu, "llmlingua", rate=0.5, tokenizer=tokenizer, iterative_size=30).generate(
        enc["input_ids"].to(DEVICE), attention_mask=enc["attention_mask"].to(DEVICE), **gen)
    assert torch.equal(got.cpu(), expected)
