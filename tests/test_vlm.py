"""Vision-language models: image-token reduction before the language model (DivPrune, PruMerge) and inside it (FastV,
PyramidDrop) on tiny LLaVA, LLaVA-NeXT (anyres tiles and newline rows), Qwen2-VL and Qwen2.5-VL (multimodal RoPE: 3-D
positions), Idefics3 and SmolVLM models."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch
from transformers import (CLIPVisionConfig, Gemma3Config, Gemma3ForConditionalGeneration, Idefics3Config, Idefics3ForConditionalGeneration, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig,
                          LlavaNextForConditionalGeneration, PaliGemmaConfig, PaliGemmaForConditionalGeneration,
                          Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                          Qwen2VLConfig, Qwen2VLForConditionalGeneration, SmolVLMConfig, SmolVLMForConditionalGeneration)

import graphprune
from graphprune.errors import RecipeError
from graphprune.recipes import RECIPES

IMAGE = 100  # the image placeholder id
VIDEO = 101  # the video placeholder id (Qwen2-VL)


@dataclass
class VLM:
    model: torch.nn.Module
    tokens: int  # image tokens per image

    @property
    def kind(self) -> str:
        return self.model.config.model_type

    def images(self, n: int, seed: int = 1) -> dict:
        """Pixel inputs of ``n`` images (one per prompt)."""
        g = torch.Generator().manual_seed(seed)
        if self.kind == "llava_next":  # 64×32 pixels: the base tile and two
            return {"pixel_values": torch.randn(n, 3, 3, 32, 32, generator=g), "image_sizes": torch.tensor([[64, 32]] * n)}
        if self.kind in ("idefics3", "smolvlm"):  # two sub-images of 8×8 patches, pixel-shuffled 2×2: 2 × 16 tokens
            return {"pixel_values": torch.randn(n, 2, 3, 32, 32, generator=g)}
        if self.kind in ("qwen2_vl", "qwen2_5_vl"):  # 8×8 patches of 2×2 pixels and 2 frames, merged 2×2: 16 tokens
            return {"pixel_values": torch.randn(n * 64, 24, generator=g), "image_grid_thw": torch.tensor([[1, 8, 8]] * n)}
        return {"pixel_values": torch.randn(n, 3, 32, 32, generator=g)}

    def one(self, images: dict, i: int) -> dict:
        """The pixel inputs of image ``i`` alone."""
        if "image_grid_thw" in images:  # (the patches of every image in one tensor)
            per = len(images["pixel_values"]) // len(images["image_grid_thw"])
            return {"pixel_values": images["pixel_values"][i * per:(i + 1) * per],
                    "image_grid_thw": images["image_grid_thw"][i:i + 1]}
        return {k: v[i:i + 1] for k, v in images.items()}

    def inputs(self, ids: torch.Tensor, images: dict, mask: torch.Tensor | None = None) -> dict:
        return inputs(ids, images, mask, kind=self.kind)

    def held(self, cache, layer: int, b: int = 0) -> set[int]:
        """The sequence indices of the tokens ``layer`` holds (PaliGemma's own forward numbers positions from 1,
        generate and graphprune from 0: counted from the first token's)."""
        st = cache.layers[layer].storage
        first = int(cache.layers[0].storage.pos[b, 0].min()) if self.kind == "paligemma" else 0
        return set((st.pos[b, 0][st.valid[b, 0]] - first).tolist())

    def prompt(self, before: int, after: int, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        text = torch.randint(2, 99, (before + after,), generator=g)
        return torch.cat([text[:before], torch.full((self.tokens,), IMAGE), text[before:]])


def tiny_vlm(kind: str) -> VLM:
    torch.manual_seed(0)
    text = dict(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=1)
    if kind in ("qwen2_vl", "qwen2_5_vl"):  # multimodal RoPE: 2 temporal, 3 height and 3 width frequencies
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        ids = dict(image_token_id=IMAGE, video_token_id=IMAGE + 1, vision_start_token_id=IMAGE + 2,
                   vision_end_token_id=IMAGE + 3)
        vision = dict(depth=2, hidden_size=64, num_heads=2, patch_size=2, temporal_patch_size=2, spatial_merge_size=2)
        if kind == "qwen2_vl":
            model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config={**vision, "embed_dim": 32},
                                                                  **ids))
        else:  # windowed vision attention in its first block
            vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=64, window_size=8, fullatt_block_indexes=[1])
            model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids))
        return VLM(model.eval(), 16)
    if kind in ("paligemma", "gemma3"):  # a SigLIP tower: 8×8 patches of 4 pixels
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                      patch_size=4)
        text.update(head_dim=16)
        if kind == "paligemma":  # Gemma; the image and the prompt are one bidirectional prefix; 64 image tokens
            config = PaliGemmaConfig(text_config={**text, "model_type": "gemma"}, image_token_id=IMAGE,
                                     vision_config={**vision, "projection_dim": 64}, projection_dim=64)
            return VLM(PaliGemmaForConditionalGeneration(config).eval(), 64)
        # Gemma 3: sliding-window layers (6 tokens) between global ones, each image bidirectional; 16 pooled tokens
        text.update(model_type="gemma3_text", sliding_window=6, layer_types=["sliding_attention", "full_attention"] * 2)
        config = Gemma3Config(text_config=text, vision_config=vision, image_token_id=IMAGE, boi_token_id=IMAGE + 2,
                              eoi_token_id=IMAGE + 3, mm_tokens_per_image=16)
        model = Gemma3ForConditionalGeneration(config).eval()
        torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.5)  # (zeros at init)
        return VLM(model, 16)
    if kind in ("idefics3", "smolvlm"):
        config = (Idefics3Config if kind == "idefics3" else SmolVLMConfig)(
            text_config={**text, "model_type": "llama"}, image_token_id=IMAGE, scale_factor=2,
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               image_size=32, patch_size=4))
        model = (Idefics3ForConditionalGeneration if kind == "idefics3" else SmolVLMForConditionalGeneration)(config)
        return VLM(model.eval(), 32)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(**text)
    if kind == "llava":  # 16 patches of 8 pixels
        return VLM(LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                                             image_token_id=IMAGE)).eval(), 16)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, vision_feature_layer=-1,
                             image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])
    return VLM(LlavaNextForConditionalGeneration(config).eval(), 56)  # 16 base + 2×4×4 tiles + 8 newline rows


@pytest.fixture(scope="module", params=["llava", "llava_next", "qwen2_vl"])
def vlm(request):
    return tiny_vlm(request.param)


def inputs(ids: torch.Tensor, images: dict, mask: torch.Tensor | None = None, prompt: int | None = None,
           kind: str = "llava") -> dict:
    """The model's keyword arguments: ids (B, T), pixel inputs, the attention mask; the token types the processor
    gives: Qwen2-VL's and Gemma 3's (1: image), PaliGemma's (0: the prompt, its bidirectional prefix; 1: tokens after
    ``prompt``, generated)."""
    out = {"input_ids": ids, **images}
    if mask is not None:
        out["attention_mask"] = mask
    if "image_grid_thw" in images or "video_grid_thw" in images:
        out["mm_token_type_ids"] = (ids == IMAGE).int() + 2 * (ids == VIDEO).int()
    elif kind in ("gemma3", "paligemma"):
        out["token_type_ids"] = (ids == IMAGE).long() if kind == "gemma3" else \
            (torch.arange(ids.shape[-1]) >= (prompt or ids.shape[-1])).long().expand_as(ids)
    return out


def batch(*prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask."""
    n = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), n, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, n - len(p):], mask[i, n - len(p):] = p, 1
    return ids, mask


VISUAL = {"fastv": {"layer": 2, "ratio": 0.5}, "pyramiddrop": {"layers": [2], "keep": 0.5}, "divprune": {"keep": 0.3},
          "prumerge": {"keep": 0.125, "plus": True}, "pact": {"layer": 2, "keep": 0.5, "cutoff": 0.3}}


@pytest.mark.parametrize("recipe", list(VISUAL))
def test_zero_setting_reproduces_the_model(vlm, recipe):
    if recipe == "prumerge" and vlm.kind != "llava":
        with pytest.raises(RecipeError, match="one grid of patches per image and the vision tower's class token"):
            graphprune.optimize(vlm.model, recipe)
        return
    layer = {"layer": 2} if recipe == "pact" else {}  # (its published layer 4 is past the tiny models' depth)
    fast = graphprune.optimize(vlm.model, recipe, **layer, **RECIPES[recipe].zero)
    ids, mask = batch(vlm.prompt(3, 5), vlm.prompt(1, 2, seed=1))
    kw = vlm.inputs(ids, vlm.images(2), mask)
    with torch.no_grad():
        assert (fast(**kw).logits[:, -1] - vlm.model(**kw).logits[:, -1]).abs().max() <= 1e-5
        gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(fast.generate(**kw, **gen), vlm.model.generate(**kw, **gen))


def masked(model, ids, images: dict, gone: dict[int, set[int]], eager: bool = False, prompt: int | None = None):
    """The oracle: the unmodified model (or its copy with eager attention), one sequence, with the tokens ``gone[l]``
    left out of the attention of every layer from l on (the model's own mask otherwise: causal, sliding windows,
    bidirectional image blocks); its output (``eager``: with the attention maps). ``prompt``: the prompt's length
    (tokens after it were generated: PaliGemma's suffix)."""
    import copy

    if eager:
        model = copy.deepcopy(model)
        model.set_attn_implementation("eager")
    n = ids.shape[-1]
    hooks = []

    def hide(module, args, kwargs, out):
        mask = kwargs["attention_mask"]
        if mask is None:  # (SDPA's own causal mask)
            mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
        drop = torch.zeros(n, n, dtype=torch.bool)
        drop[:, sorted(out)] = True
        drop &= ~torch.eye(n, dtype=torch.bool)  # (a dropped row still sees itself; its output is never used)
        mask = mask & ~drop if mask.dtype == torch.bool else mask.masked_fill(drop, torch.finfo(mask.dtype).min)
        return args, {**kwargs, "attention_mask": mask}

    for i, layer in enumerate(model.get_decoder().layers):
        out = set().union(*(g for l, g in gone.items() if l <= i))
        hooks.append(layer.register_forward_pre_hook(
            lambda m, a, kw, out=out: hide(m, a, kw, out), with_kwargs=True))
    try:
        return model(**inputs(ids[None], images, prompt=prompt, kind=model.config.model_type), output_attentions=eager)
    finally:
        for h in hooks:
            h.remove()


def attention_of_last_token(model, ids, images, layer: int, gone: dict[int, set[int]]) -> torch.Tensor:
    """The last token's attention in ``layer`` (eager attention; ``gone`` as in :func:`masked`), head mean, (L,)."""
    return masked(model, ids, images, gone, eager=True).attentions[layer][0, :, -1].mean(0)


@pytest.mark.parametrize("ratio", [0.5, 0.75])
@pytest.mark.parametrize("seed", [0, 1])
def test_fastv_drops_the_papers_tokens_and_dropping_equals_masking(vlm, ratio, seed):
    """The kept set is FastV's (the last token's head-mean attention in layer K-1 ranks the image tokens, the top
    round(n·(1-R)) stay), and the output equals the unmodified model with those tokens masked out from layer K on."""
    k = 2
    fast = graphprune.optimize(vlm.model, "fastv", layer=k, ratio=ratio)
    ids, images = vlm.prompt(4, 6, seed), vlm.images(1, seed)
    with torch.no_grad():
        out = fast(**vlm.inputs(ids[None], images), use_cache=True)
        att = attention_of_last_token(vlm.model, ids, images, k - 1, {})
        image = (ids == IMAGE).nonzero().flatten().tolist()
        expected = set(image) - set(sorted(image, key=lambda i: -float(att[i]))[:round(len(image) * (1 - ratio))])
        full = [i for i, layer in enumerate(out.cache.layers) if layer.window is None]  # (sliding layers hold only
        # their window: Gemma 3)
        gone = set(range(len(ids))) - vlm.held(out.cache, full[-1])
        assert gone == expected
        assert vlm.held(out.cache, k - 1) == set(range(len(ids))) or k - 1 not in full
        oracle = masked(vlm.model, ids, images, {k: gone}).logits[0, -1]
        assert (out.logits[0, -1] - oracle).abs().max() <= 1e-5


@pytest.mark.parametrize("keep, layers", [(0.5, []), (0.6, [1, 3])])
@pytest.mark.parametrize("seed", [0, 1])
def test_pyramiddrop_drops_the_papers_tokens_and_dropping_equals_masking(vlm, keep, layers, seed):
    """Stage by stage, before each boundary layer s the last token's head-mean attention in layer s (over the tokens
    that reached it) ranks the image tokens left, and int(n·λ^stage) of the prompt's n stay; the output equals the
    unmodified model with the dropped tokens masked out from their boundary layer on."""
    fast = graphprune.optimize(vlm.model, "pyramiddrop", keep=keep, layers=layers)
    ids, images = vlm.prompt(4, 6, seed), vlm.images(1, seed)
    bounds = layers or [1, 2, 3]  # a quarter, half and three quarters of 4 layers
    with torch.no_grad():
        out = fast(**vlm.inputs(ids[None], images), use_cache=True)
        image = set((ids == IMAGE).nonzero().flatten().tolist())
        gone: dict[int, set[int]] = {}
        for stage, s in enumerate(bounds, 1):
            att = attention_of_last_token(vlm.model, ids, images, s, gone)
            left = sorted(image - set().union(*gone.values()), key=lambda i: -float(att[i]))
            gone[s] = set(left[int(len(image) * keep ** stage):])
            assert vlm.held(out.cache, s - 1) - vlm.held(out.cache, s) == gone[s], f"stage {stage}"
        oracle = masked(vlm.model, ids, images, gone).logits[0, -1]
        assert (out.logits[0, -1] - oracle).abs().max() <= 1e-5


@pytest.mark.parametrize("recipe", list(VISUAL))
def test_a_left_padded_batch_equals_each_sample_alone_and_generates(vlm, recipe):
    if recipe == "prumerge" and vlm.kind != "llava":
        pytest.skip("PruMerge is defined on one grid of patches per image (LLaVA-1.5): refused, tested above")
    fast = graphprune.optimize(vlm.model, recipe, **VISUAL[recipe])
    prompts, images = [vlm.prompt(3, 7, seed=2), vlm.prompt(1, 2, seed=3)], vlm.images(2, seed=4)
    ids, mask = batch(*prompts)
    gen = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        together = fast.generate(**vlm.inputs(ids, images, mask), **gen)[:, ids.shape[1]:]
        first = fast(**vlm.inputs(ids, images, mask)).logits[:, -1]
        for i, p in enumerate(prompts):
            alone = fast(**vlm.inputs(p[None], vlm.one(images, i)), use_cache=True)
            assert (first[i] - alone.logits[0, -1]).abs().max() <= 1e-5
            assert alone.cache.slots()[3] < len(p)  # image tokens went
            assert torch.equal(together[i], fast.generate(**vlm.inputs(p[None], vlm.one(images, i)), **gen)[0, len(p):])
        sampled = fast.generate(**vlm.inputs(ids, images, mask), max_new_tokens=5, do_sample=True,
                                pad_token_id=0)
    assert sampled.shape == (2, ids.shape[1] + 5)


def test_visual_recipes_refuse_text_only_models():
    from transformers import LlamaForCausalLM

    text = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2))
    with pytest.raises(RecipeError, match="image tokens of a vision-language model"):
        graphprune.optimize(text, "fastv")


def test_options_that_do_not_fit_the_model_are_refused(vlm):
    from graphprune.errors import ScheduleError

    with pytest.raises(ScheduleError, match="below the model's 4 layers"):
        graphprune.optimize(vlm.model, "fastv", layer=4)
    with pytest.raises(ScheduleError, match="below the model's 4 layers"):
        graphprune.optimize(vlm.model, ["pyramiddrop", "snapkv"], layers=[2, 5])
    with pytest.raises(ScheduleError, match="positions must be"):
        graphprune.optimize(vlm.model, "divprune", positions="shift")


def test_a_visual_recipe_composes_with_a_cache_policy(vlm):
    """recipe=["fastv", "snapkv"]: FastV's rows and SnapKV's eviction; options go to the recipe that has them."""
    both = graphprune.optimize(vlm.model, ["fastv", "snapkv"], ratio=0.5, budget=12, window=4)
    assert both.report.options == {"fastv": {**RECIPES["fastv"]().options(), "ratio": 0.5},
                                   "snapkv": {**RECIPES["snapkv"]().options(), "budget": 12, "window": 4}}
    fastv = graphprune.optimize(vlm.model, "fastv", ratio=0.5)
    ids, images = vlm.prompt(4, 6), vlm.images(1)
    with torch.no_grad():
        out = both(**vlm.inputs(ids[None], images), use_cache=True)
        alone = fastv(**vlm.inputs(ids[None], images), use_cache=True)
        assert torch.equal(out.logits[0, -1], alone.logits[0, -1])  # (the prompt pass attends before evicting)
        assert out.cache.slots() == [12] * 4 and alone.cache.slots()[0] == len(ids)
        for layer in (0, 2):  # snapkv's choice among the tokens each layer holds
            assert vlm.held(out.cache, layer) <= vlm.held(alone.cache, layer)
        tokens = both.generate(**vlm.inputs(ids[None], images), max_new_tokens=4, min_new_tokens=4, do_sample=False,
                               pad_token_id=0)
    assert tokens.shape[1] == len(ids) + 4
    before = graphprune.optimize(vlm.model, ["divprune", "fastv"], keep=0.5, ratio=0.5)  # before and inside the LM
    with torch.no_grad():
        slots = before(**vlm.inputs(ids[None], images), use_cache=True).cache.slots()
    n = vlm.tokens
    assert slots == [len(ids) - n + n // 2] * 2 + [len(ids) - n + round(n // 2 * 0.5)] * 2
    three = graphprune.optimize(vlm.model, ["divprune", "fastv", "snapkv"], keep=0.5, ratio=0.5, budget=12, window=4)
    with torch.no_grad():
        assert three(**vlm.inputs(ids[None], images), use_cache=True).cache.slots() == [12] * 4
    drop = graphprune.optimize(vlm.model, ["pyramiddrop", "h2o"], layers=[2], keep=0.25, budget=12)  # stops rows
    alone = graphprune.optimize(vlm.model, "pyramiddrop", layers=[2], keep=0.25)  # before a layer's attention
    with torch.no_grad():
        out, ref = (m(**vlm.inputs(ids[None], images), use_cache=True) for m in (drop, alone))
    assert torch.equal(out.logits[0, -1], ref.logits[0, -1]) and out.cache.slots() == [12] * 4
    assert all(vlm.held(out.cache, layer) <= vlm.held(ref.cache, layer) for layer in range(4))
    with pytest.raises(RecipeError, match="both evict"):
        graphprune.optimize(vlm.model, ["snapkv", "h2o"])
    with pytest.raises(RecipeError, match="does not compose"):
        graphprune.optimize(vlm.model, ["pact", "snapkv"], layer=2)
    with pytest.raises(RecipeError, match="option window belongs to none"):
        graphprune.optimize(vlm.model, ["fastv", "h2o"], window=3)


def divprune_reference(features: torch.Tensor, keep: float) -> set[int]:
    """DivPrune by its definition, with lists: cosine distances; first the token farthest from its nearest neighbour,
    then the token farthest from the chosen set (its nearest chosen token); round(keep·n) of them."""
    x = [f / f.norm() for f in features.double()]
    n = len(x)
    dist = [[1 - float(a @ b) for b in x] for a in x]
    nearest = [min(dist[i][j] for j in range(n) if j != i) for i in range(n)]
    chosen = [max(range(n), key=lambda i: (nearest[i], -i))]
    while len(chosen) < round(keep * n):
        rest = [i for i in range(n) if i not in chosen]
        chosen.append(max(rest, key=lambda i: (min(dist[c][i] for c in chosen), -i)))
    return set(chosen)


@pytest.mark.parametrize("keep", [0.098, 0.3])
def test_divprune_keeps_the_papers_tokens_and_dropping_equals_masking(vlm, keep):
    """Each image's most diverse projected tokens go in (the reference above); the output equals the unmodified model
    with the other image tokens masked out of every layer (positions kept), at the prompt and while decoding."""
    fast = graphprune.optimize(vlm.model, "divprune", keep=keep)
    ids, images = vlm.prompt(4, 6), vlm.images(1)
    with torch.no_grad():
        features = vlm.model.model.get_image_features(**images, return_dict=True).pooler_output[0]
        image = (ids == IMAGE).nonzero().flatten()
        gone = set(image.tolist()) - {int(image[i]) for i in divprune_reference(features, keep)}
        out = fast(**vlm.inputs(ids[None], images), use_cache=True)
        full = next(i for i, layer in enumerate(out.cache.layers) if layer.window is None)  # (not a sliding layer)
        assert vlm.held(out.cache, full) == set(range(len(ids))) - gone
        assert out.cache.get_seq_length() == len(ids)  # decoding goes on at the full prompt's positions
        assert (out.logits[0, -1] - masked(vlm.model, ids, images, {0: gone}).logits[0, -1]).abs().max() <= 1e-5
        if vlm.kind.startswith("llava"):  # a positional call alike
            assert torch.equal(fast(ids[None], *images.values()).logits, out.logits)
        got = fast.generate(**vlm.inputs(ids[None], images), max_new_tokens=4, min_new_tokens=4, do_sample=False,
                            pad_token_id=0, output_logits=True, return_dict_in_generate=True,
                            suppress_tokens=[IMAGE])  # (the oracle would read a generated placeholder as an image)
        seq = ids
        for t, logits in zip(got.sequences[0, len(ids):], got.logits):  # the oracle, step by step without a cache
            assert (masked(vlm.model, seq, images, {0: gone}, prompt=len(ids)).logits[0, -1] - logits[0]).abs().max() \
                <= 1e-5
            seq = torch.cat([seq, t[None]])


def without_dropped(vlm, ids, mask, images, keep: float) -> torch.Tensor:
    """The attention mask with the image tokens DivPrune drops (by the reference) set to 0."""
    features = vlm.model.model.get_image_features(**images, return_dict=True).pooler_output
    without = mask.clone()
    for b in range(len(ids)):
        image = (ids[b] == IMAGE).nonzero().flatten()
        kept = {int(image[i]) for i in divprune_reference(features[b], keep)}
        without[b, [int(i) for i in image if int(i) not in kept]] = 0
    return without


def test_divprune_renumbered_equals_the_model_without_the_dropped_tokens(vlm):
    """positions="renumber" (the authors' code): the same as the unmodified model given an attention mask that leaves
    the dropped tokens out (generate then numbers the others contiguously), through greedy decoding, batched."""
    if vlm.kind.startswith("qwen"):
        with pytest.raises(RecipeError, match="numbers image tokens in three dimensions"):
            graphprune.optimize(vlm.model, "divprune", positions="renumber")
        return
    fast = graphprune.optimize(vlm.model, "divprune", keep=0.3, positions="renumber")
    prompts, images = [vlm.prompt(3, 7, seed=2), vlm.prompt(1, 2, seed=3)], vlm.images(2, seed=4)
    ids, mask = batch(*prompts)
    with torch.no_grad():
        without = without_dropped(vlm, ids, mask, images, 0.3)
        gen = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0, output_logits=True,
                   return_dict_in_generate=True)
        expected = vlm.model.generate(**vlm.inputs(ids, images, without), **gen)
        got = fast.generate(**vlm.inputs(ids, images, mask), **gen)
        assert torch.equal(got.sequences, expected.sequences)
        for a, b in zip(got.logits, expected.logits):  # every step's logits
            assert (a - b).abs().max() <= 1e-5


def prumerge_reference(hidden: torch.Tensor, last, keep, plus: bool) -> torch.Tensor:
    """PruMerge(+) on one image by the authors' definition, with numpy quartiles and loops: ``hidden`` (1 + n, C) the
    taken hidden states, ``last`` the vision tower's last layer; the merged tokens before the projector."""
    import numpy as np

    x = last.layer_norm1(hidden).double()
    q = x @ last.self_attn.q_proj.weight.double().T + last.self_attn.q_proj.bias.double()
    k = x @ last.self_attn.k_proj.weight.double().T + last.self_attn.k_proj.bias.double()
    att = torch.softmax(q[0] @ k.T / q.shape[-1] ** 0.5, -1)[1:]
    n = len(att)
    if keep == "adaptive":
        q1, q3 = np.percentile(att.numpy(), 25), np.percentile(att.numpy(), 75)
        count = int(sum(float(a) > q3 + 1.5 * (q3 - q1) for a in att))
    else:
        count = int(n * keep)
    chosen = sorted(range(n), key=lambda i: -float(att[i]))[:count]
    if plus and count:
        step = int(int(1 / (count / n)) / 3)
        chosen += [i for i in range(0, n - 1, step) if i not in chosen]
    keys = [kk / kk.norm() for kk in k[1:]]
    patches = hidden[1:].double()
    out = []
    for i in chosen:
        near = sorted((j for j in range(n) if j != i), key=lambda j: -float(keys[i] @ keys[j]))[:32]
        out.append(patches[i] + sum(patches[j] * att[j] for j in near))
    out.append(sum(patches[j] * att[j] for j in range(n) if j not in chosen))
    return torch.stack(out)


@pytest.mark.parametrize("keep, plus", [("adaptive", False), ("adaptive", True), (0.25, False)])
def test_prumerge_merges_as_the_authors_code_and_equals_the_model_given_those_tokens(vlm, keep, plus):
    """The image's tokens are PruMerge's (the reference above, through the projector) and the output equals the
    unmodified model given them in the image's place (a shorter prompt), through greedy decoding."""
    if vlm.kind != "llava":
        pytest.skip("PruMerge is defined on one grid of patches per image (LLaVA-1.5): refused, tested above")
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    fast = graphprune.optimize(vlm.model, "prumerge", keep=keep, plus=plus)
    ids, images = vlm.prompt(4, 6), vlm.images(1, seed=3)
    images["pixel_values"][0, :, :8, :8] *= 20  # two bright patches: the class token's attention has outliers
    images["pixel_values"][0, :, 16:24, 8:16] *= 20
    with torch.no_grad():
        encoded = vlm.model.model.get_image_features(**images, return_dict=True)
        hidden = encoded.hidden_states[vlm.model.config.vision_feature_layer][0]
        last = vlm.model.model.vision_tower.encoder.layers[-1]
        tokens = vlm.model.model.multi_modal_projector(prumerge_reference(hidden, last, keep, plus).float())
        assert len(tokens) == {("adaptive", False): 3, ("adaptive", True): 9, (0.25, False): 5}[keep, plus]
        image = (ids == IMAGE).nonzero().flatten()
        short = torch.cat([ids[:int(image[0])], torch.full((len(tokens),), IMAGE), ids[int(image[-1]) + 1:]])
        gen = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True,
                   return_dict_in_generate=True)
        expected = vlm.model.generate(input_ids=short[None], mm_encoder_outputs={
            "image": BaseModelOutputWithPooling(pooler_output=[tokens])}, **gen)
        got = fast.generate(**vlm.inputs(ids[None], images), **gen)
        assert torch.equal(got.sequences[0, len(ids):], expected.sequences[0, len(short):])
        for a, b in zip(got.logits, expected.logits):
            assert (a - b).abs().max() <= 1e-4


def turbo_tower_reference(vlm, pixel_values, r: int, alpha: float) -> list[torch.Tensor]:
    """Turbo by its definition inside LLaVA's CLIP tower, by hand: each encoder layer up to the one the model takes
    runs its attention (size bias on the logits), then the merge of reference.turbo_merge_one (keys and the class
    token's attention of that attention), then its MLP; the class token dropped, the projector. One image at a time."""
    from tests.reference import turbo_merge_one

    tower, config = vlm.model.model.vision_tower, vlm.model.config
    layers = tower.encoder.layers[: config.vision_feature_layer % (len(tower.encoder.layers) + 1)]
    out = []
    for px in pixel_values:
        x = tower.pre_layrnorm(tower.embeddings(px[None]))[0]
        size = torch.ones(len(x), 1)
        for layer in layers:
            attn, h = layer.self_attn, layer.layer_norm1(x)
            heads, d = attn.num_heads, attn.head_dim
            q, k, v = (p(h).view(len(x), heads, d).transpose(0, 1) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
            probs = ((q @ k.transpose(-2, -1)) * attn.scale + size[:, 0].log()).softmax(-1)
            x = x + attn.out_proj((probs @ v).transpose(0, 1).reshape(len(x), -1))
            x, size = turbo_merge_one(x, size, k.mean(0), probs[:, 0, :].mean(0), r, alpha, 0)
            x = x + layer.mlp(layer.layer_norm2(x))
        out.append(vlm.model.model.multi_modal_projector(x[1:]))
    return out


@pytest.mark.parametrize("alpha", [5.0, 0.1])
def test_turbo_merges_inside_the_vision_tower_and_equals_the_model_given_those_tokens(alpha):
    """graphprune.optimize(vlm, "turbo"): the encoder recipe inside LLaVA's vision tower (captured and rewritten as on
    any ViT); each image's tokens are the by-hand reference's and the output equals the unmodified model given them in
    the image's place (a shorter prompt), through greedy decoding, batched with left padding. Zero setting: the model."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    vlm = tiny_vlm("llava")
    fast = graphprune.optimize(vlm.model, "turbo", r=3, alpha=alpha, min_tokens=0)
    assert fast.report.recipe == "turbo" and fast.report.options["alpha"] == alpha
    prompts, images = [vlm.prompt(4, 6, seed=5), vlm.prompt(2, 3, seed=6)], vlm.images(2, seed=8)
    ids, mask = batch(*prompts)
    gen = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True,
               return_dict_in_generate=True)
    with torch.no_grad():
        tokens = turbo_tower_reference(vlm, images["pixel_values"], 3, alpha)
        assert [len(t) for t in tokens] == [vlm.tokens - 3] * 2
        redundancy = turbo_tower_reference(vlm, images["pixel_values"], 3, 0.0)  # (ToMe's choice: another one here)
        assert alpha < 1 or all((a - b).abs().max() > 1e-3 for a, b in zip(tokens, redundancy))
        got = fast.generate(**vlm.inputs(ids, images, mask), **gen)
        for i, p in enumerate(prompts):
            image = (p == IMAGE).nonzero().flatten()
            short = torch.cat([p[:int(image[0])], torch.full((len(tokens[i]),), IMAGE), p[int(image[-1]) + 1:]])
            expected = vlm.model.generate(input_ids=short[None], mm_encoder_outputs={
                "image": BaseModelOutputWithPooling(pooler_output=[tokens[i]])}, **gen)
            assert torch.equal(got.sequences[i, ids.shape[1]:], expected.sequences[0, len(short):])
            for a, b in zip(got.logits, expected.logits):
                assert (a[i] - b[0]).abs().max() <= 1e-4
        zero = graphprune.optimize(vlm.model, "turbo", **RECIPES["turbo"].zero)
        kw = vlm.inputs(ids, images, mask)
        assert (zero(**kw).logits[:, -1] - vlm.model(**kw).logits[:, -1]).abs().max() <= 1e-5
        both = graphprune.optimize(vlm.model, ["turbo", "snapkv"], r=3, alpha=alpha, min_tokens=0, budget=12, window=4)
        out = both(**kw, use_cache=True)  # (the prompt pass attends before evicting)
        assert (out.logits[:, -1] - fast(**kw).logits[:, -1]).abs().max() <= 1e-5 and out.cache.slots() == [12] * 4
    with pytest.raises(RecipeError, match="class token"):
        graphprune.optimize(tiny_vlm("qwen2_vl").model, "turbo")
    with pytest.raises(RecipeError, match="at most one encoder recipe"):
        graphprune.optimize(vlm.model, ["turbo", "tome"])


@pytest.mark.parametrize("recipe, options, tokens", [("evit", {"keep": 0.5, "locations": [0]}, [9, 9]),
                                                     ("ats", {"capacity": 0.5, "locations": [0]}, None)])
def test_any_encoder_recipe_runs_inside_the_vision_tower(recipe, options, tokens):
    """EViT (a fused token, no sizes) and ATS (its own count per image: the padding slots stay out of the prompt) in
    LLaVA's tower: a left-padded batch generates as each prompt alone; EViT's count is ceil(keep·16) + the fused one."""
    vlm = tiny_vlm("llava")
    fast = graphprune.optimize(vlm.model, recipe, **options)
    prompts, images = [vlm.prompt(4, 6, seed=5), vlm.prompt(2, 3, seed=6)], vlm.images(2, seed=8)
    ids, mask = batch(*prompts)
    gen = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        counts = [len(t) for t in fast.graphprune.images(images["pixel_values"])]
        assert tokens is None and all(0 < c <= vlm.tokens // 2 for c in counts) or counts == tokens
        together = fast.generate(**vlm.inputs(ids, images, mask), **gen)[:, ids.shape[1]:]
        for i, p in enumerate(prompts):
            alone = fast.generate(**vlm.inputs(p[None], vlm.one(images, i)), **gen)[0, len(p):]
            assert torch.equal(together[i], alone)


def test_the_vision_towers_recipe_runs_in_the_models_dtype():
    """A bfloat16 LLaVA: the tower is captured with an example in its own dtype (a float32 example failed at the
    first prompt with a dtype mismatch). At r=0 the images' tokens are the model's own; at r=3 each image has 3 fewer
    per merging block, in bfloat16."""
    import copy

    vlm = tiny_vlm("llava")
    half = copy.deepcopy(vlm.model).to(torch.bfloat16)
    pixels = vlm.images(2, seed=8)["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        own = half.model.get_image_features(pixel_values=pixels, vision_feature_layer=-2,
                                            vision_feature_select_strategy="default")
        own = own.pooler_output if hasattr(own, "pooler_output") else own
        zero = graphprune.optimize(half, "turbo", r=0).graphprune.images(pixels)
        merged = graphprune.optimize(half, "turbo", r=3, min_tokens=0).graphprune.images(pixels)
    assert all(torch.allclose(z.float(), o.float(), atol=1e-2) for z, o in zip(zero, own))
    assert [m.shape[0] for m in merged] == [vlm.tokens - 3] * 2 and all(m.dtype == torch.bfloat16 for m in merged)


@pytest.mark.parametrize("positions", ["keep", "renumber"])
def test_beam_search_keeps_each_beams_positions(vlm, positions):
    """Beam search (each prompt expanded to its beams, the cache reordered between steps) over reduced images: the same
    beams as the unmodified model without the dropped tokens (renumbered), or as each prompt alone (kept positions)."""
    if positions == "renumber" and vlm.kind.startswith("qwen"):
        pytest.skip("Qwen2-VL keeps 3-D positions (refusing renumber is tested above)")
    fast = graphprune.optimize(vlm.model, "divprune", keep=0.3, positions=positions)
    prompts, images = [vlm.prompt(3, 7, seed=2), vlm.prompt(1, 2, seed=3)], vlm.images(2, seed=4)
    ids, mask = batch(*prompts)
    gen = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0, num_beams=3)
    with torch.no_grad():
        got = fast.generate(**vlm.inputs(ids, images, mask), **gen)
        if positions == "renumber":
            without = without_dropped(vlm, ids, mask, images, 0.3)
            assert torch.equal(got, vlm.model.generate(**vlm.inputs(ids, images, without), **gen))
        else:  # each sequence alone, greedy beams alike
            for b, p in enumerate(prompts):
                alone = fast.generate(**vlm.inputs(p[None], vlm.one(images, b)), **gen)
                assert torch.equal(got[b, ids.shape[1]:], alone[0, len(p):])


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "idefics3", "smolvlm", "paligemma", "gemma3"])
def test_more_vlms_are_reduced_alike(kind):
    """Qwen2.5-VL (windowed attention in its vision tower, Qwen2-VL's multimodal RoPE), Idefics3 and SmolVLM (sub-images,
    pixel shuffle), PaliGemma (a bidirectional prefix) and Gemma 3 (bidirectional images, sliding-window layers): the
    zero setting reproduces each, FastV and DivPrune equal masking (the model's own mask, less the dropped tokens),
    and a left-padded batch equals each sample alone."""
    vlm = tiny_vlm(kind)
    test_zero_setting_reproduces_the_model(vlm, "divprune")
    test_fastv_drops_the_papers_tokens_and_dropping_equals_masking(vlm, 0.5, 0)
    test_divprune_keeps_the_papers_tokens_and_dropping_equals_masking(vlm, 0.3)
    test_a_left_padded_batch_equals_each_sample_alone_and_generates(vlm, "pyramiddrop")


def test_qwen2_vl_decodes_outside_generate_at_generates_positions():
    """Qwen2-VL's layers get text positions only inside generate; graphprune's copy builds all four rows itself, so a
    plain forward loop over the cache it returns gives generate's tokens (image tokens left out, positions kept)."""
    from graphprune.kv.model import returned_cache

    vlm = tiny_vlm("qwen2_vl")
    fast = graphprune.optimize(vlm.model, "divprune", keep=0.3)
    ids, images = vlm.prompt(4, 6), vlm.images(1)
    with torch.no_grad():
        expected = fast.generate(**vlm.inputs(ids[None], images), max_new_tokens=5, do_sample=False, pad_token_id=0)
        out = fast(**vlm.inputs(ids[None], images), use_cache=True)
        tokens = [int(out.logits[0, -1].argmax())]
        for _ in range(4):
            out = fast(input_ids=torch.tensor([tokens[-1:]]), cache=returned_cache(out), use_cache=True)
            tokens.append(int(out.logits[0, -1].argmax()))
    assert expected[0, len(ids):].tolist() == tokens


def saved_llava(folder):
    """A tiny LLaVA folder as the Hub has them: config, safetensors weights, and a processor (a word-level tokenizer
    with an <image> token, a 32-pixel CLIP image processor, a chat template)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    tiny_vlm("llava").model.save_pretrained(folder)
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, IMAGE)}, "<image>": IMAGE}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                        extra_special_tokens={"image_token": "<image>"})
    template = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}"
                "w7 w8 w9 {% endif %}{% endfor %}{% endfor %}w10")
    LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                   tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1, chat_template=template).save_pretrained(folder)
    return folder


def test_cli_exports_and_benches_a_vlm_folder(tmp_path):
    """graphprune-cli on a VLM folder: export writes the recipe as a schedule, or the image side to ONNX (what else
    ONNX would need is refused with the reason); bench
    builds image prompts with the model's processor (random pixels, or a folder of images) and reports time to first
    token, decode speed, cache memory and fidelity."""
    from PIL import Image
    from typer.testing import CliRunner

    from graphprune.cli import app

    folder, runner = saved_llava(tmp_path / "llava"), CliRunner()
    res = runner.invoke(app, ["export", str(folder), "--recipe", "fastv", "-O", "ratio=0.75", "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    fast = graphprune.optimize(tiny_vlm("llava").model, schedule=tmp_path / "out" / "schedule.json")
    assert fast.report.recipe == "fastv" and fast.report.options["ratio"] == 0.75
    res = runner.invoke(app, ["export", str(folder), "--recipe", "pact", "-O", "layer=2", "--target", "onnx", "-o",
                              str(tmp_path / "x")])
    assert res.exit_code != 0 and "data-dependent number of rows" in res.output
    res = runner.invoke(app, ["export", str(folder), "--recipe", "divprune", "--target", "onnx", "-o", str(tmp_path / "v")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "v" / "vision.json").read_text())["tokens_per_image"] == round(0.098 * 16)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (40 + 8 * i, 32), (60 * i, 90, 200)).save(images / f"{i}.png")
    for data in ([], ["--data", str(images)]):
        res = runner.invoke(app, ["bench", str(folder), "--recipe", "divprune", "--sweep", "keep=1.0,0.25", "--batch",
                                  "2", "--rounds", "1", "--warmup", "0", "--new-tokens", "4", "--json",
                                  str(tmp_path / "b.json"), *data])
        assert res.exit_code == 0, res.output
        rows = json.loads((tmp_path / "b.json").read_text())["results"]
        assert [r["options"]["keep"] for r in rows] == [1.0, 0.25]
        assert rows[0]["fidelity"]["top1_agreement"] == 1.0 and rows[0]["fidelity"]["cache_ratio"] == 1.0
        assert rows[1]["fidelity"]["cache_ratio"] < 0.6 and rows[1]["prefill_ms"] > 0 and rows[1]["baseline_prefill_ms"] > 0


@pytest.mark.parametrize("kind", ["llava", "gemma3"])
def test_the_image_side_exports_to_onnx_with_a_fixed_share(kind, tmp_path):
    """target='onnx' on a VLM with divprune: vision tower, projector and DivPrune in one graph (dynamic number of
    images), checked in ONNX Runtime; its tokens are DivPrune's (the reference) of the model's own image features, and
    the language model given them in place of the placeholders continues as the eager copy does. What else a VLM
    asks of ONNX is refused with the reason."""
    from graphprune.errors import GraphPruneError
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    vlm = tiny_vlm(kind)
    reducer = graphprune.optimize(vlm.model, "divprune", keep=0.3, target="onnx", output=tmp_path / "vision")
    assert {"vision.onnx", "vision.json"} <= {p.name for p in (tmp_path / "vision").iterdir()}
    images = vlm.images(3, seed=7)
    tokens, kept = reducer(images["pixel_values"])
    with torch.no_grad():
        features = vlm.model.model.get_image_features(**images, return_dict=True).pooler_output
        for i in range(3):
            assert set(kept[i].tolist()) == divprune_reference(features[i], 0.3)
            assert (tokens[i] - features[i][kept[i]]).abs().max() <= 1e-4
    if kind == "llava":
        with pytest.raises(GraphPruneError, match="data-dependent number of image tokens"):
            graphprune.optimize(vlm.model, "prumerge", target="onnx", output=tmp_path / "x")
    with pytest.raises(GraphPruneError, match="varying numbers of tokens"):
        graphprune.optimize(tiny_vlm("qwen2_vl").model, "divprune", target="onnx", output=tmp_path / "x")
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())
    if kind != "llava":  # (Gemma 3 masks by index: given gapped positions it fails; its DivPrune oracle is above)
        return
    with torch.no_grad():
        ids = vlm.prompt(4, 6)
        image = (ids == IMAGE).nonzero().flatten()
        short = torch.cat([ids[:int(image[0])], torch.full((tokens.shape[1],), IMAGE), ids[int(image[-1]) + 1:]])
        position = torch.cat([torch.arange(int(image[0])), image[kept[0]], torch.arange(int(image[-1]) + 1, len(ids))])
        given = vlm.model(input_ids=short[None], position_ids=position[None], mm_encoder_outputs={
            "image": BaseModelOutputWithPooling(pooler_output=[tokens[0]])})
        fast = graphprune.optimize(vlm.model, "divprune", keep=0.3)
        assert (fast(**vlm.inputs(ids[None], vlm.one(images, 0))).logits[0, -1] - given.logits[0, -1]).abs().max() <= 1e-4


def pact_reference(model, ids, images: dict, kind: str, layer: int, keep: float, cutoff: float, retrieve: float):
    """PACT by its definition, with loops, on the unmodified model: the hidden states entering ``layer``, EUTI, DBDPC
    as a walk in decreasing density (a token is a centre when farther than d_c from every centre so far), nearest-
    centre assignment and retrieval. Returns {centre row: member rows}, and the layer's input (1, T, C)."""
    seen = {}
    block = model.get_decoder().layers[layer]
    hook = block.register_forward_pre_hook(lambda m, a, kw: seen.update(h=a[0] if a else kw["hidden_states"],
                                                                       pe=kw["position_embeddings"]), with_kwargs=True)
    try:
        model(**inputs(ids[None], images, kind=kind))
    finally:
        hook.remove()
    h, (cos, sin) = seen["h"][0].double(), (t[0].double() for t in seen["pe"])
    attn, n = block.self_attn, len(ids)
    x = block.input_layernorm(seen["h"])[0].double()
    d = attn.head_dim
    q = (x @ attn.q_proj.weight.double().T + (0 if attn.q_proj.bias is None else attn.q_proj.bias.double())).view(n, -1, d)
    k = (x @ attn.k_proj.weight.double().T + (0 if attn.k_proj.bias is None else attn.k_proj.bias.double())).view(n, -1, d)
    visual = [i for i in range(n) if int(ids[i]) == IMAGE]
    scope = list(range(visual[-1] + 1))
    heads, group = q.shape[1], q.shape[1] // k.shape[1]
    score = {}
    for j in visual:
        total = 0.0
        for hq in range(heads):
            mean = sum(q[i, hq] for i in scope) / len(scope)
            logits = [float(mean @ k[t, hq // group]) / d ** 0.5 for t in scope]
            top = max(logits)
            total += math.exp(logits[j] - top) / sum(math.exp(v - top) for v in logits)
        score[j] = total / heads * float(h[j].norm())
    kept = sorted(sorted(visual, key=lambda j: -score[j])[:int(len(visual) * keep)])
    pruned = [j for j in visual if j not in kept]
    half = d // 2
    rot = k * cos[:, None] + torch.cat([-k[..., half:], k[..., :half]], -1) * sin[:, None]
    feat = {j: rot[j].flatten() / rot[j].flatten().norm() for j in visual}

    def dist(a, b):
        return max(1 - float(feat[a] @ feat[b]), 0.0)

    density = {i: sum(math.exp(-(dist(i, j) / 2) ** 2) for j in kept) for i in kept}
    centres = []
    for i in sorted(kept, key=lambda i: -density[i]):
        if all(dist(i, c) > cutoff for c in centres):
            centres.append(i)
    members = {c: [c] for c in centres}
    for i in kept:
        if i not in centres:
            members[min(centres, key=lambda c: dist(i, c))].append(i)
    for i in pruned:
        c = min(centres, key=lambda c: dist(i, c))
        if dist(i, c) <= retrieve * cutoff:
            members[c].append(i)
    return members, seen["h"]


def pact_oracle(model, ids, images, kind, layer, members, h):
    """The unmodified model with PACT's merge done by hand: at ``layer`` each centre's row takes its members' mean,
    the other image tokens leave the attention of every layer from there on, and each centre's key adds log(size) to
    every attention logit there (through decoding: ``ids`` may be longer than the prompt)."""
    n = len(ids)
    gone = [i for i in range(h.shape[1]) if int(ids[i]) == IMAGE and i not in members]
    bias = torch.zeros(n, n)
    bias[:, gone] = -torch.inf
    bias[gone, gone] = 0  # (a dropped row still sees itself; its output is never used)
    for c, m in members.items():
        bias[:, c] = math.log(len(m))
    hooks = []

    def merge(module, args, kwargs):
        hidden = (args[0] if args else kwargs["hidden_states"]).clone()
        for c, m in members.items():
            hidden[0, c] = h[0, m].mean(0)
        return (hidden, *args[1:]) if args else args, ({**kwargs, "hidden_states": hidden} if not args else kwargs)

    def add_bias(module, args, kwargs):
        mask = kwargs["attention_mask"]
        mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None] if mask is None else mask
        mask = torch.zeros(mask.shape).masked_fill(~mask, -torch.inf) if mask.dtype == torch.bool else mask
        return args, {**kwargs, "attention_mask": mask + bias}

    layers = model.get_decoder().layers
    hooks.append(layers[layer].register_forward_pre_hook(merge, with_kwargs=True))
    for block in layers[layer:]:
        hooks.append(block.register_forward_pre_hook(add_bias, with_kwargs=True))
    try:
        return model(**inputs(ids[None], images, kind=kind)).logits[0, -1]
    finally:
        for hk in hooks:
            hk.remove()


@pytest.mark.parametrize("keep, cutoff", [(0.5, 0.3), (0.8, 0.4)])
def test_pact_merges_as_the_paper_and_equals_the_model_given_its_merge(vlm, keep, cutoff):
    """PACT's centres and members are the reference's (EUTI, DBDPC, retrieval within α·d_c), and the output equals the
    unmodified model given that merge by hand (the centres' mean hidden states, the other image tokens out of later
    layers' attention, log(size) on the centres' keys), at the prompt and at every greedy decoding step."""
    layer, retrieve = 2, 1.5
    fast = graphprune.optimize(vlm.model, "pact", layer=layer, keep=keep, cutoff=cutoff, retrieve=retrieve)
    ids, images = vlm.prompt(4, 6), vlm.images(1)
    with torch.no_grad():
        members, h = pact_reference(vlm.model, ids, images, vlm.kind, layer, keep, cutoff, retrieve)
        out = fast(**vlm.inputs(ids[None], images), use_cache=True)
        text = int((ids != IMAGE).sum())
        assert vlm.held(out.cache, layer) == vlm.held(out.cache, 0) - {int(i) for i in (ids == IMAGE).nonzero()
                                                                         if int(i) not in members}
        assert out.cache.slots() == [len(ids)] * layer + [text + len(members)] * (4 - layer)
        assert 1 < len(members) < vlm.tokens and max(len(m) for m in members.values()) > 1
        assert (out.logits[0, -1] - pact_oracle(vlm.model, ids, images, vlm.kind, layer, members, h)).abs().max() <= 1e-4
        got = fast.generate(**vlm.inputs(ids[None], images), max_new_tokens=3, min_new_tokens=3, do_sample=False,
                            pad_token_id=0, output_logits=True, return_dict_in_generate=True, suppress_tokens=[IMAGE])
        seq = ids
        for t, logits in zip(got.sequences[0, len(ids):], got.logits):
            assert (pact_oracle(vlm.model, seq, images, vlm.kind, layer, members, h) - logits[0]).abs().max() <= 1e-4
            seq = torch.cat([seq, t[None]])


def ttm_reference(features: torch.Tensor, frames: int, merge: float) -> list[int]:
    """DyCoke's temporal token merging by its code, with loops: in frame pairs the second keeps its tokens least similar
    to the first's at the same place, then in each window of four frames but the last the third is compared with the
    first instead; an odd last frame is left out. The kept tokens' indices."""
    n = len(features) // frames
    f = features.view(frames, n, -1).double()
    keep = int((1 - merge) * n)

    def least(a, b):
        sims = [float(f[a][t] @ f[b][t] / (f[a][t].norm() * f[b][t].norm())) for t in range(n)]
        return sorted(range(n), key=lambda t: sims[t])[:keep]

    out = {}
    for i in range(0, frames - 1, 2):
        out[i], out[i + 1] = list(range(n)), least(i, i + 1)
    for i in range(0, frames - 4, 4):
        out[i + 2] = least(i, i + 2)
    return sorted(t + i * n for i in out for t in out[i])


@pytest.mark.parametrize("frames", [8, 7, 4])
def test_dycoke_temporal_merging_keeps_the_codes_tokens(frames):
    from graphprune.kv.policies.dycoke import temporal_merge

    features = torch.randn(frames * 16, 32, generator=torch.Generator().manual_seed(frames))
    for merge in (0.7, 0.5):
        assert temporal_merge(features, frames, merge).tolist() == ttm_reference(features, frames, merge)


def video_prompt(frames: int = 8):
    """A Qwen2-VL video of ``frames`` temporal patches of 8×8 patches (16 tokens each, merged 2×2) between text."""
    g = torch.Generator().manual_seed(3)
    video = {"pixel_values_videos": torch.randn(frames * 64, 24, generator=g),
             "video_grid_thw": torch.tensor([[frames, 8, 8]])}
    text = torch.randint(2, 99, (9,), generator=g)
    return torch.cat([text[:4], torch.full((frames * 16,), VIDEO), text[4:]]), video


def masked_rows(model, ids, media: dict, gone: set[int], layer: int, late: dict[int, set[int]]):
    """The unmodified model (eager attention), one sequence: the tokens ``gone`` out of every layer's attention, and
    from ``layer`` on each row r also without the tokens ``late[r]`` (a decoding step's own choice)."""
    import copy

    model = copy.deepcopy(model)
    model.set_attn_implementation("eager")
    n, hooks = len(ids), []
    for i, block in enumerate(model.get_decoder().layers):
        see = torch.ones(n, n, dtype=torch.bool).tril()
        see[:, sorted(gone)] = False
        if i >= layer:
            for r, cols in late.items():
                see[r, sorted(cols)] = False
        see |= torch.eye(n, dtype=torch.bool)
        mask = torch.zeros(n, n).masked_fill(~see, torch.finfo(torch.float32).min)[None, None]
        hooks.append(block.register_forward_pre_hook(
            lambda m, a, kw, mask=mask: (a, {**kw, "attention_mask": mask}), with_kwargs=True))
    try:
        return model(**inputs(ids[None], media), output_attentions=True)
    finally:
        for h in hooks:
            h.remove()


def test_dycoke_prunes_a_video_as_its_code_and_equals_the_model_so_masked():
    """On a Qwen2-VL video: the tokens temporal merging leaves out are the code's (the reference above), and every
    decoding step attends from layer L on to the top int(n·(1−P)) video tokens by the new token's attention in layer
    L−1 (unless that attention is as similar as 0.9 to the last step's): each step's logits equal the unmodified
    model with exactly those tokens masked, row by row."""
    vlm = tiny_vlm("qwen2_vl")
    layer, prune, merge = 2, 0.5, 0.5
    fast = graphprune.optimize(vlm.model, "dycoke", layer=layer, prune=prune, merge=merge)
    ids, video = video_prompt()
    where = (ids == VIDEO).nonzero().flatten()
    with torch.no_grad():
        features = vlm.model.model.get_video_features(**video, return_dict=True).pooler_output[0]
        kept = {int(where[i]) for i in ttm_reference(features, 8, merge)}
        gone = {int(i) for i in where} - kept
        out = fast(**inputs(ids[None], video), use_cache=True)
        assert vlm.held(out.cache, 0) == set(range(len(ids))) - gone
        assert (out.logits[0, -1] - masked_rows(vlm.model, ids, video, gone, layer, {}).logits[0, -1]).abs().max() \
            <= 1e-5
        got = fast.generate(**inputs(ids[None], video), max_new_tokens=4, min_new_tokens=4, do_sample=False,
                            pad_token_id=0, output_logits=True, return_dict_in_generate=True,
                            suppress_tokens=[IMAGE, VIDEO])
        seq, late, previous, pruned = ids, {}, None, 0
        for step, (t, logits) in enumerate(zip(got.sequences[0, len(ids):], got.logits)):
            if step:  # a decoding step: its own choice of video tokens from layer L on
                att = masked_rows(vlm.model, seq, video, gone, layer, late).attentions[layer - 1][0, :, -1].mean(0)
                now = att[sorted(kept)]
                similar = previous is not None and float(torch.nn.functional.cosine_similarity(now, previous, 0)) >= 0.9
                previous = now
                if not similar:
                    ranked = sorted(kept, key=lambda j: -float(att[j]))
                    late[len(seq) - 1] = set(ranked[int(len(kept) * (1 - prune)):])
                    pruned += 1
            expected = masked_rows(vlm.model, seq, video, gone, layer, late).logits[0, -1]
            assert (expected - logits[0]).abs().max() <= 1e-5, f"step {step}"
            seq = torch.cat([seq, t[None]])
    assert pruned >= 1


def test_dycoke_batches_videos_as_each_alone():
    """Two videos with prompts of different lengths, left padded: each sequence's greedy tokens equal its own run alone
    (the frames come from generate's positions, the gate and the kept sets per sequence); the zero setting reproduces
    the model."""
    vlm = tiny_vlm("qwen2_vl")
    fast = graphprune.optimize(vlm.model, "dycoke", layer=2, prune=0.5, merge=0.5)
    (a, va), (b, vb) = video_prompt(8), video_prompt(4)
    b = torch.cat([torch.tensor([7, 9, 11]), b])
    ids, mask = batch(a, b)
    both = {"pixel_values_videos": torch.cat([va["pixel_values_videos"], vb["pixel_values_videos"]]),
            "video_grid_thw": torch.cat([va["video_grid_thw"], vb["video_grid_thw"]])}
    gen = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        together = fast.generate(**inputs(ids, both, mask), **gen)[:, ids.shape[1]:]
        for i, (p, v) in enumerate([(a, va), (b, vb)]):
            assert torch.equal(together[i], fast.generate(**inputs(p[None], v), **gen)[0, len(p):])
        zero = graphprune.optimize(vlm.model, "dycoke", layer=2, **RECIPES["dycoke"].zero)
        assert torch.equal(zero.generate(**inputs(ids, both, mask), **gen), vlm.model.generate(**inputs(ids, both, mask), **gen))


def renumbered(model, ids, images: dict, gone: dict[int, set[int]], kind: str):
    """The unmodified model without the tokens ``gone[s]`` from layer s on, each layer numbering the tokens it has left
    0, 1, … in order (PyramidDrop's code): their attention masked out, the others' rotary positions renumbered."""
    n, decoder, hooks = len(ids), model.get_decoder(), []
    for i, block in enumerate(decoder.layers):
        out = set().union(*(g for s, g in gone.items() if s <= i))
        left = torch.tensor([j not in out for j in range(n)])
        pos = (left.long().cumsum(0) - 1).clamp(min=0)
        see = torch.ones(n, n, dtype=torch.bool).tril() & left[None, :]
        see |= torch.eye(n, dtype=torch.bool)

        def hook(m, a, kw, pos=pos, see=see):
            h = a[0] if a else kw["hidden_states"]
            return a, {**kw, "attention_mask": see[None, None], "position_embeddings": decoder.rotary_emb(h, pos[None])}
        hooks.append(block.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        return model(**inputs(ids[None], images, kind=kind)).logits[0, -1]
    finally:
        for h in hooks:
            h.remove()


def test_pyramiddrop_renumbered_equals_the_model_without_the_dropped_tokens_stage_by_stage(vlm):
    """positions="renumber" (the authors' code): each stage numbers its tokens afresh and decoding steps move down by
    the tokens dropped up to each stage; the output equals the unmodified model without the dropped tokens, renumbered
    layer by layer, at the prompt and every greedy decoding step. (The kept set at one boundary is the one tested
    above with kept positions: the ranking runs before the renumbering.) Batches equal each sample alone over two
    stages; models whose layers rotate in 3-D or by several frequencies are refused."""
    if vlm.kind.startswith("qwen"):
        with pytest.raises(RecipeError, match="numbers image tokens in three dimensions"):
            graphprune.optimize(vlm.model, "pyramiddrop", positions="renumber")
        return
    fast = graphprune.optimize(vlm.model, "pyramiddrop", keep=0.5, layers=[2], positions="renumber")
    keep = graphprune.optimize(vlm.model, "pyramiddrop", keep=0.5, layers=[2])
    ids, images = vlm.prompt(4, 6), vlm.images(1)
    with torch.no_grad():
        held = keep(**vlm.inputs(ids[None], images), use_cache=True).cache
        gone = {2: vlm.held(held, 1) - vlm.held(held, 2)}
        out = fast(**vlm.inputs(ids[None], images), use_cache=True)
        assert out.cache.slots() == [len(ids)] * 2 + [len(ids) - len(gone[2])] * 2
        assert (out.logits[0, -1] - renumbered(vlm.model, ids, images, gone, vlm.kind)).abs().max() <= 1e-5
        got = fast.generate(**vlm.inputs(ids[None], images), max_new_tokens=4, min_new_tokens=4, do_sample=False,
                            pad_token_id=0, output_logits=True, return_dict_in_generate=True, suppress_tokens=[IMAGE])
        seq = ids
        for t, logits in zip(got.sequences[0, len(ids):], got.logits):
            assert (renumbered(vlm.model, seq, images, gone, vlm.kind) - logits[0]).abs().max() <= 1e-5
            seq = torch.cat([seq, t[None]])
        two = graphprune.optimize(vlm.model, "pyramiddrop", keep=0.5, layers=[1, 3], positions="renumber")
        prompts, pixels = [vlm.prompt(3, 7, seed=2), vlm.prompt(1, 2, seed=3)], vlm.images(2, seed=4)
        ids, mask = batch(*prompts)
        gen = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        together = two.generate(**vlm.inputs(ids, pixels, mask), **gen)[:, ids.shape[1]:]
        for i, p in enumerate(prompts):
            assert torch.equal(together[i], two.generate(**vlm.inputs(p[None], vlm.one(pixels, i)), **gen)[0, len(p):])
    with pytest.raises(RecipeError, match="rotate by different frequencies"):
        graphprune.optimize(tiny_vlm("gemma3").model, "pyramiddrop", positions="renumber")


@pytest.mark.parametrize("recipe, options, rows", [
    (["divprune", "snapkv"], {"keep": 0.5, "budget": 12, "window": 4}, None),
    ("fastv", {"layer": 2, "ratio": 0.5}, [26, 18, 18, 18]),  # (10 text tokens + 16 image tokens; 8 stop after layer 1)
    pytest.param("h2o", {"budget": 12}, None, marks=pytest.mark.slow),
    pytest.param(["pyramiddrop", "h2o"], {"layers": [1, 3], "keep": 0.5, "budget": 14}, [26, 18, 18, 14],
                 marks=pytest.mark.slow),
    pytest.param(["divprune", "fastv", "snapkv"], {"keep": 0.5, "ratio": 0.5, "budget": 12, "window": 4},
                 [18, 14, 14, 14], marks=pytest.mark.slow)])
def test_a_vlm_with_a_fixed_budget_exports_whole_to_onnx(recipe, options, rows, tmp_path):
    """LLaVA with a fixed-share image recipe before the language model (DivPrune) or inside it (FastV, PyramidDrop:
    pruned inside the prefill graph, each layer's rows a static count), and a fixed-budget cache policy (or none):
    vision, prefill and decode graphs; ONNX Runtime's greedy generation from the full prompt and its pixels equals the
    eager copy's, token for token, on another left-padded batch and other images than the export's. What cannot
    export is refused with the reason."""
    from graphprune.errors import GraphPruneError

    vlm = tiny_vlm("llava")
    runner = graphprune.optimize(vlm.model, recipe, target="onnx", output=tmp_path / "vlm", **options)
    assert {"vision.onnx", "prefill.onnx", "decode.onnx", "decoder.json"} <= {p.name for p in (tmp_path / "vlm").iterdir()}
    assert runner.meta["rows_per_layer"] == rows
    fast = graphprune.optimize(vlm.model, recipe, **options)
    prompts, images = [vlm.prompt(4, 6, seed=5), vlm.prompt(2, 8, seed=6)], vlm.images(2, seed=8)
    ids, mask = batch(*prompts)
    with torch.no_grad():
        expected = fast.generate(input_ids=ids, attention_mask=mask, **images, max_new_tokens=6, min_new_tokens=6,
                                 do_sample=False, pad_token_id=0)[:, ids.shape[1]:]
    assert torch.equal(runner.generate(ids, images["pixel_values"], mask, 6), expected)
    if rows is not None:  # a prompt without its image would need other row counts
        text = torch.cat([ids[:1, :vlm.tokens].clamp(max=IMAGE - 1), ids[:1, vlm.tokens:]], 1)
        with pytest.raises(GraphPruneError, match=f"must hold {vlm.tokens} image tokens"):
            runner.generate(torch.cat([ids[1:], text]), images["pixel_values"], mask, 6)
    with pytest.raises(GraphPruneError, match="data-dependent number of rows"):
        graphprune.optimize(vlm.model, "pact", layer=2, target="onnx", output=tmp_path / "x")
    with pytest.raises(GraphPruneError, match="data-dependent number of rows"):
        graphprune.optimize(vlm.model, "pyramiddrop", positions="renumber", target="onnx", output=tmp_path / "x")
    with pytest.raises(GraphPruneError, match="fixed budget"):
        graphprune.optimize(vlm.model, "h2o", budget=0.5, target="onnx", output=tmp_path / "x")
    with pytest.raises(GraphPruneError, match="for LLaVA so far"):
        graphprune.optimize(tiny_vlm("qwen2_vl").model, "h2o", budget=12, target="onnx", output=tmp_path / "x")


@pytest.mark.slow
def test_cli_exports_a_whole_vlm_with_a_cache_policy(tmp_path):
    """graphprune-cli export VLM_FOLDER --recipe h2o --target onnx: the image side and the language model's graphs."""
    from typer.testing import CliRunner

    from graphprune.cli import app

    folder = saved_llava(tmp_path / "llava")
    res = CliRunner().invoke(app, ["export", str(folder), "--recipe", "h2o", "-O", "budget=12", "--target", "onnx",
                                   "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert {"vision.onnx", "prefill.onnx", "decode.onnx"} <= {p.name for p in (tmp_path / "out").iterdir()}
    assert "prefill.onnx" in res.output and json.loads((tmp_path / "out" / "report.json").read_text())["recipe"] == "h2o"
