"""ToMe for Stable Diffusion on diffusers denoisers and pipelines (tiny random configs, built here)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import graphprune
from graphprune.diffusion.denoiser import Draws, ReducedDenoiser
from graphprune.errors import GraphPruneError, RecipeError, ScheduleError, UnsupportedArchitectureError

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8).eval()


@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(1)
    return diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                           num_layers=2, sample_size=16, patch_size=2, num_embeds_ada_norm=10,
                                           norm_num_groups=4).eval()


def _unet_inputs(batch=2, size=16, t=700.0):
    g = torch.Generator().manual_seed(batch * 100 + size)
    return {"sample": torch.randn(batch, 4, size, size, generator=g), "timestep": torch.full((batch,), t),
            "encoder_hidden_states": torch.randn(batch, 7, 32, generator=g)}


def _dit_inputs(batch=2):
    g = torch.Generator().manual_seed(7)
    return {"hidden_states": torch.randn(batch, 4, 16, 16, generator=g), "timestep": torch.full((batch,), 3),
            "class_labels": torch.arange(batch) % 10}


def _pixart():
    torch.manual_seed(2)
    model = diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                               out_channels=8, num_layers=2, sample_size=16, patch_size=2,
                                               cross_attention_dim=16, caption_channels=12, norm_num_groups=4).eval()
    g = torch.Generator().manual_seed(8)
    inputs = {"hidden_states": torch.randn(2, 4, 16, 16, generator=g), "timestep": torch.tensor([3, 3]),
              "encoder_hidden_states": torch.randn(2, 5, 12, generator=g),
              "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    return model, inputs


def _sd3():
    torch.manual_seed(3)
    model = diffusers.SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                            caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
                                            pos_embed_max_size=16, dual_attention_layers=(0,)).eval()
    g = torch.Generator().manual_seed(9)
    inputs = {"hidden_states": torch.randn(2, 4, 16, 16, generator=g), "timestep": torch.tensor([3, 3]),
              "encoder_hidden_states": torch.randn(2, 5, 16, generator=g),
              "pooled_projections": torch.randn(2, 8, generator=g)}
    return model, inputs


# ------------------------------------------------------------------ the published algorithm, written out directly

def reference_matching(x, w, h, sx, sy, r, cells):
    """Bipartite soft matching with one destination per sy×sx cell, as published: a buffer of the grid with -1 at
    each cell's chosen slot, argsort (destinations first), cosine similarity of sources to destinations, the r best
    sources merged by an unweighted mean with their destination (itself included), unmerge copies it back."""
    b, n, _ = x.shape
    hsy, wsx = h // sy, w // sx
    view = torch.zeros(hsy, wsx, sy * sx, dtype=torch.int64)
    view.scatter_(2, cells.reshape(hsy, wsx, 1), -torch.ones(hsy, wsx, 1, dtype=torch.int64))
    view = view.view(hsy, wsx, sy, sx).transpose(1, 2).reshape(hsy * sy, wsx * sx)
    buffer = torch.zeros(h, w, dtype=torch.int64)
    buffer[: hsy * sy, : wsx * sx] = view
    order = buffer.reshape(1, -1, 1).argsort(dim=1)
    dst_idx_all, src_idx_all = order[:, : hsy * wsx], order[:, hsy * wsx:]

    def split(t):
        c = t.shape[-1]
        return t.gather(1, src_idx_all.expand(b, -1, c)), t.gather(1, dst_idx_all.expand(b, -1, c))

    m = x / x.norm(dim=-1, keepdim=True)
    a, bb = split(m)
    scores = a @ bb.transpose(-1, -2)
    r = min(a.shape[1], r)
    node_max, node_idx = scores.max(dim=-1)
    edge = node_max.argsort(dim=-1, descending=True)[..., None]
    unm, src = edge[:, r:], edge[:, :r]
    dst = node_idx[..., None].gather(1, src)

    def merge(t):
        s, d = split(t)
        c = t.shape[-1]
        u = s.gather(1, unm.expand(-1, -1, c))
        moved = s.gather(1, src.expand(-1, -1, c))
        d = d.scatter_reduce(1, dst.expand(-1, -1, c), moved, reduce="mean")
        return torch.cat([u, d], dim=1)

    def unmerge(t):
        k = unm.shape[1]
        c = t.shape[-1]
        u, d = t[:, :k], t[:, k:]
        moved = d.gather(1, dst.expand(-1, -1, c))
        out = torch.zeros(b, n, c, dtype=t.dtype)
        out.scatter_(1, dst_idx_all.expand(b, -1, c), d)
        out.scatter_(1, src_idx_all.expand(b, -1, 1).gather(1, unm).expand(-1, -1, c), u)
        out.scatter_(1, src_idx_all.expand(b, -1, 1).gather(1, src).expand(-1, -1, c), moved)
        return out

    positions = torch.cat([src_idx_all.expand(b, -1, 1).gather(1, unm)[..., 0], dst_idx_all[..., 0].expand(b, -1)], 1)
    return merge, unmerge, positions  # (positions: the token each merged token stands at, in merge's output order)


def reference_run(model, inputs, ratio, seed, calls, ops=("attn1",), max_downsample=1, patch=1, use_rand=True):
    """The published method on a private copy of ``model`` (hooks on the copy's blocks and ops), ``calls`` forwards;
    the cells' generator seeded with ``seed`` and drawn once per block call."""
    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    sample = inputs.get("sample", inputs.get("hidden_states"))
    H, W = sample.shape[-2] // patch, sample.shape[-1] // patch

    def block_pre(mod, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        n = x.shape[1]
        down = math.ceil(math.sqrt(H * W // n))
        if down > max_downsample:
            state["m"] = None
            return
        w, h = math.ceil(W / down), math.ceil(H / down)
        cells = torch.randint(4, size=(h // 2, w // 2, 1), generator=gen) if use_rand and x.shape[0] % 2 == 0 else \
            torch.zeros(h // 2, w // 2, 1, dtype=torch.int64)
        state["m"] = reference_matching(x, w, h, 2, 2, int(n * ratio), cells)

    def op_pre(mod, args, kwargs):
        if state["m"] is not None:
            if args:
                return (state["m"][0](args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": state["m"][0](kwargs["hidden_states"])}

    def op_post(mod, args, kwargs, out):
        if state["m"] is not None:
            return state["m"][1](out)

    for mod in model.modules():
        if type(mod).__name__ == "BasicTransformerBlock":
            mod.register_forward_pre_hook(block_pre, with_kwargs=True)
            for name in ops:
                getattr(mod, name).register_forward_pre_hook(op_pre, with_kwargs=True)
                getattr(mod, name).register_forward_hook(op_post, with_kwargs=True)
    with torch.no_grad():
        return [model(**inputs).sample for _ in range(calls)]


def _flux(batch=2, h=8, w=6, text=5):
    torch.manual_seed(4)
    model = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=2,
                                             attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                             pooled_projection_dim=8, axes_dims_rope=(2, 2, 4)).eval()
    g = torch.Generator().manual_seed(10)
    ids = torch.zeros(h, w, 3)
    ids[..., 1], ids[..., 2] = torch.arange(h)[:, None], torch.arange(w)[None]
    inputs = {"hidden_states": torch.randn(batch, h * w, 4, generator=g), "timestep": torch.full((batch,), 0.5),
              "encoder_hidden_states": torch.randn(batch, text, 16, generator=g),
              "pooled_projections": torch.randn(batch, 8, generator=g), "img_ids": ids.reshape(-1, 3),
              "txt_ids": torch.zeros(text, 3)}
    return model, inputs


def reference_flux(model, inputs, ratio, h, w):
    """ToMe for SD on Flux, written out with hooks on a private copy, one sample at a time (batch 1: top-left cells):
    each block's image tokens matched; its attention's image tokens merged (past the text tokens in a single block),
    each merged token rotated by the position of the token it stands at, and the image output unmerged."""
    model = copy.deepcopy(model)
    state = {}

    def block_pre(mod, args, kwargs):
        x = kwargs["hidden_states"]
        cells = torch.zeros(h // 2, w // 2, 1, dtype=torch.int64)
        state["m"] = reference_matching(x, w, h, 2, 2, int(x.shape[1] * ratio), cells)
        state["text"] = kwargs["encoder_hidden_states"].shape[1] if "Single" in type(mod).__name__ else 0

    def attn_pre(mod, args, kwargs):
        (merge, _, at), text = state["m"], state["text"]
        x, (cos, sin) = kwargs["hidden_states"], kwargs["image_rotary_emb"]
        t = cos.shape[0] - (x.shape[1] - text)
        idx = torch.cat([torch.arange(t), at[0] + t])
        return args, {**kwargs, "hidden_states": torch.cat([x[:, :text], merge(x[:, text:])], 1),
                      "image_rotary_emb": (cos[idx], sin[idx])}

    def attn_post(mod, args, kwargs, out):
        (_, unmerge, _), text = state["m"], state["text"]
        if isinstance(out, tuple):
            return (unmerge(out[0]), *out[1:])
        return torch.cat([out[:, :text], unmerge(out[:, text:])], 1)

    for mod in model.modules():
        if type(mod).__name__ in ("FluxTransformerBlock", "FluxSingleTransformerBlock"):
            mod.register_forward_pre_hook(block_pre, with_kwargs=True)
            mod.attn.register_forward_pre_hook(attn_pre, with_kwargs=True)
            mod.attn.register_forward_hook(attn_post, with_kwargs=True)
    batch = inputs["hidden_states"].shape[0]
    with torch.no_grad():
        return torch.cat([model(**{k: v[b:b + 1] if isinstance(v, torch.Tensor) and v.shape[0] == batch else v
                                   for k, v in inputs.items()}).sample for b in range(batch)])


# ------------------------------------------------------------------------------------------------------ tests

def test_zero_ratio_reproduces_every_denoiser(unet, dit):
    cases = [(unet, _unet_inputs()), (dit, _dit_inputs()), _pixart(), _sd3()]
    for model, inputs in cases:
        with torch.no_grad():
            expected = model(**inputs)
            got = graphprune.optimize(model, "tomesd", ratio=0.0)(**inputs)
        assert type(got) is type(expected)
        assert (got.sample - expected.sample).abs().max() <= 1e-5, type(model).__name__
        reduced = graphprune.optimize(model, "tomesd", ratio=0.5, merge_mlp=True)
        with torch.no_grad():
            assert (reduced(**inputs).sample - expected.sample).abs().max() > 1e-4  # merging does change the output


@pytest.mark.parametrize("h, w, sx, sy", [(8, 8, 2, 2), (7, 9, 2, 3), (5, 6, 3, 1)])
def test_merge_equals_the_published_matching_on_any_grid(h, w, sx, sy):
    """One block call's merge, unmerge and merged tokens' positions equal the published algorithm's, also where rows
    and columns past whole cells are always sources; on the same inputs twice (the layout kept from the first call)
    and under inference mode."""
    from graphprune.diffusion.merge import Grid, Merge, draw_cells

    gen = torch.Generator().manual_seed(h * w)
    x = torch.randn(3, h * w, 6, generator=gen)
    grid = Grid(h=h, w=w, sx=sx, sy=sy)
    for r in (0, h * w // 3, h * w):  # (r past the sources merges them all)
        cells = draw_cells(grid, gen)
        merge, unmerge, positions = reference_matching(x, w, h, sx, sy, r, cells)
        for mode in (torch.no_grad, torch.inference_mode, torch.no_grad):
            with mode():
                ours = Merge(x, grid, cells, r)
                merged = ours.merge(x)
                assert (ours.unmerge(merged) - unmerge(merge(x))).abs().max() <= 1e-6
                # the merged tokens, each at the position it stands at (the published order of equal keys is argsort's)
                at, theirs = ours.positions().sort(dim=1), positions.sort(dim=1)
                assert torch.equal(at.values, theirs.values)
                take = lambda t, i: t.gather(1, i[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
                assert (take(merged, at.indices) - take(merge(x), theirs.indices)).abs().max() <= 1e-6


@pytest.mark.parametrize("options", [{}, {"merge_crossattn": True, "merge_mlp": True, "max_downsample": 2},
                                     {"use_rand": False, "ratio": 0.75}])
def test_unet_equals_the_published_algorithm(unet, options):
    options = {"ratio": 0.5, **options}
    inputs = _unet_inputs()
    fast = graphprune.optimize(unet, "tomesd", seed=11, **options)
    with torch.no_grad():
        got = [fast(**inputs).sample for _ in range(2)]  # the second call draws new cells, as the published code does
    ops = ["attn1"] + (["attn2"] if options.get("merge_crossattn") else []) + (["ff"] if options.get("merge_mlp")
                                                                                  else [])
    expected = reference_run(unet, inputs, options["ratio"], 11, 2, ops, options.get("max_downsample", 1),
                             use_rand=options.get("use_rand", True))
    for g, e in zip(got, expected):
        assert (g - e).abs().max() <= 1e-5
    if options.get("use_rand", True):
        assert (got[0] - got[1]).abs().max() > 1e-5  # new cells at each call


def test_odd_batch_uses_top_left_cells_and_no_draw(unet):
    """An odd batch (the two guidance halves run apart) merges into each cell's top-left token and draws nothing."""
    inputs = _unet_inputs(batch=1)
    fast = graphprune.optimize(unet, "tomesd", ratio=0.5, seed=4)
    top_left = graphprune.optimize(unet, "tomesd", ratio=0.5, use_rand=False)
    with torch.no_grad():
        assert torch.equal(fast(**inputs).sample, top_left(**inputs).sample)
    assert torch.equal(fast.generator(torch.device("cpu")).get_state(), torch.Generator().manual_seed(4).get_state())


def test_dit_equals_the_published_algorithm_on_its_patch_grid(dit):
    """On a transformer the grid is the patch grid (the published code reaches it with max_downsample=2 on DiT)."""
    inputs = _dit_inputs()
    fast = graphprune.optimize(dit, "tomesd", ratio=0.5, seed=5)
    with torch.no_grad():
        got = fast(**inputs).sample
    expected = reference_run(dit, inputs, 0.5, 5, 1, patch=2)[0]
    assert (got - expected).abs().max() <= 1e-5


def test_each_sample_of_a_batch_equals_it_alone(unet):
    inputs = _unet_inputs(batch=4)
    fast = graphprune.optimize(unet, "tomesd", ratio=0.5, merge_mlp=True, seed=2)
    draws = Draws(fast.generator(torch.device("cpu")))
    with torch.no_grad():
        batch = fast.call((), {**inputs, "return_dict": False}, draws)[0]
        cells = [c for _, c in draws.log]
        for i in range(4):
            alone = fast.call((), {k: v[i:i + 1] for k, v in inputs.items()} | {"return_dict": False},
                              Draws(given=cells))[0]
            assert (alone[0] - batch[i]).abs().max() <= 1e-5


def test_ratio_schedules_by_step_and_by_timestep(unet):
    fast = graphprune.optimize(unet, "tomesd", ratio=[0.75, 0.5, 0.25])
    steps = [fast.ratio_at(torch.tensor([t])) for t in (900, 900, 600, 300, 100, 900)]
    assert steps == [0.75, 0.75, 0.5, 0.25, 0.25, 0.75]  # a step per new timestep; a rise starts a new generation
    by_noise = graphprune.optimize(unet, "tomesd", ratio=lambda t: 0.75 if t > 500 else 0.0, seed=1)
    full = graphprune.optimize(unet, "tomesd", ratio=0.0)
    with torch.no_grad():
        low, high = _unet_inputs(t=200.0), _unet_inputs(t=800.0)
        assert torch.equal(by_noise(**low).sample, full(**low).sample)
        assert (by_noise(**high).sample - full(**high).sample).abs().max() > 1e-4


def test_pipeline_images_and_the_users_pipeline(unet):
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                  latent_channels=4, norm_num_groups=4, sample_size=32).eval()
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                             scheduler=diffusers.DDIMScheduler(clip_sample=False), safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    text = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(3))

    def images(p):
        return p(prompt_embeds=text[:1], negative_prompt_embeds=text[1:], num_inference_steps=3, height=32,
                 width=32, generator=torch.Generator().manual_seed(0), output_type="pt").images

    before = images(pipe)
    same = graphprune.optimize(pipe, "tomesd", ratio=0.0)
    assert torch.equal(images(same), before)
    fast = graphprune.optimize(pipe, "tomesd", ratio=0.5, seed=0)
    assert isinstance(fast.unet, ReducedDenoiser) and fast.vae is pipe.vae and fast.scheduler is pipe.scheduler
    assert (images(fast) - before).abs().max() > 1e-4
    assert pipe.unet is unet and type(unet) is diffusers.UNet2DConditionModel
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules())
    assert torch.equal(images(pipe), before)  # the user's pipeline runs as before


def _vae(latent_channels):
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                   latent_channels=latent_channels, norm_num_groups=4, sample_size=32,
                                   shift_factor=0.0).eval()


def _transformer_pipeline(kind):
    """(pipeline, its call's keyword inputs): a tiny PixArt, SD3 or Flux pipeline without text encoders, prompted with
    embeddings (the pipelines accept them in place of text)."""
    g = torch.Generator().manual_seed(11)
    if kind == "pixart":
        transformer, _ = _pixart()
        pipe = diffusers.PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=_vae(4), transformer=transformer,
                                             scheduler=diffusers.DPMSolverMultistepScheduler())
        mask = torch.ones(1, 5, dtype=torch.int64)
        call = {"prompt_embeds": torch.randn(1, 5, 12, generator=g), "prompt_attention_mask": mask,
                "negative_prompt_embeds": torch.randn(1, 5, 12, generator=g), "negative_prompt_attention_mask": mask,
                "negative_prompt": None, "use_resolution_binning": False}
    elif kind == "sd3":
        transformer, _ = _sd3()
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=_vae(4),
            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
            tokenizer_3=None)
        call = {"prompt_embeds": torch.randn(1, 5, 16, generator=g), "pooled_prompt_embeds": torch.randn(1, 8, generator=g),
                "negative_prompt_embeds": torch.randn(1, 5, 16, generator=g),
                "negative_pooled_prompt_embeds": torch.randn(1, 8, generator=g)}
    else:
        torch.manual_seed(4)
        transformer = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4)).eval()
        pipe = diffusers.FluxPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=_vae(4),
                                      text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                      transformer=transformer)
        call = {"prompt_embeds": torch.randn(1, 5, 16, generator=g), "pooled_prompt_embeds": torch.randn(1, 8, generator=g)}
    pipe.set_progress_bar_config(disable=True)
    return pipe, call


@pytest.mark.parametrize("kind", ["pixart", "sd3", "flux"])
def test_transformer_pipelines_images_and_the_users_pipeline(kind):
    """Whole PixArt, SD3 and Flux pipelines: ratio 0 gives the pipeline's own images, ratio 0.5 reduces the
    transformer (and changes the images), and the user's pipeline and transformer are untouched."""
    pipe, call = _transformer_pipeline(kind)
    transformer = pipe.transformer

    def images(p):
        return p(**call, num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0),
                 output_type="pt").images

    before = images(pipe)
    assert torch.equal(images(graphprune.optimize(pipe, "tomesd", ratio=0.0)), before)
    fast = graphprune.optimize(pipe, "tomesd", ratio=0.5, seed=0)
    assert isinstance(fast.transformer, ReducedDenoiser) and fast.vae is pipe.vae and fast.transformer.blocks
    assert (images(fast) - before).abs().max() > 1e-4
    assert pipe.transformer is transformer and not isinstance(transformer, ReducedDenoiser)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in transformer.modules())
    assert torch.equal(images(pipe), before)


def test_flux_merges_image_tokens_at_their_positions():
    """Flux: joint blocks merge the image tokens, single blocks the image part of their one stream; a merged token is
    rotated by its destination's position (per sample). Equal to the definition written out (batch 1 per sample,
    top-left cells); ratio 0 exact; a batch with random cells equals each sample alone with the same cells."""
    model, inputs = _flux()
    with torch.no_grad():
        base = model(**inputs).sample
        assert (graphprune.optimize(model, "tomesd", ratio=0.0)(**inputs).sample - base).abs().max() == 0
        for ratio in (0.5, 0.75):
            fast = graphprune.optimize(model, "tomesd", ratio=ratio, use_rand=False)
            assert fast.blocks == ["transformer_blocks.0", "single_transformer_blocks.0", "single_transformer_blocks.1"]
            out = fast(**inputs).sample
            assert (out - base).abs().max() > 1e-3  # (it merges)
            assert (out - reference_flux(model, inputs, ratio, 8, 6)).abs().max() <= 1e-5
        fast = graphprune.optimize(model, "tomesd", ratio=0.5, seed=2)
        draws = Draws(torch.Generator().manual_seed(5))
        out = fast.call((), inputs, draws).sample
        for b in range(2):
            one = {k: v[b:b + 1] if isinstance(v, torch.Tensor) and v.shape[0] == 2 else v for k, v in inputs.items()}
            alone = fast.call((), one, Draws(given=[c for _, c in draws.log])).sample
            assert (alone - out[b:b + 1]).abs().max() <= 1e-5
    with pytest.raises(UnsupportedArchitectureError, match="img_ids"):  # packed tokens: their grid comes from img_ids
        fast(**{k: v for k, v in inputs.items() if k != "img_ids"})


def test_flux_step_exports_at_its_batch(tmp_path):
    """A reduced Flux step exports with its batch static (each sample's attention runs apart, at its merged tokens'
    positions; the token grid is fixed at the example's img_ids): within 1e-4 of eager over two calls with random
    cells; another batch is refused with what to do; the TensorRT profile fixes every shape."""
    model, inputs = _flux(batch=1)
    onnx = graphprune.optimize(model, "tomesd", ratio=0.5, seed=2, target="onnx", output=tmp_path / "f",
                               example_inputs=inputs)
    assert onnx.max_abs_diff <= 1e-4
    eager = graphprune.optimize(model, "tomesd", ratio=0.5, seed=2)
    with torch.no_grad():
        for _ in range(2):
            assert (eager(**inputs).sample - onnx(**inputs)).abs().max() <= 1e-4
    with pytest.raises(GraphPruneError, match="exported for a batch of 1"):
        onnx(**_flux(batch=2)[1])
    graphprune.optimize(model, "tomesd", ratio=0.5, seed=2, target="trt", output=tmp_path / "t", example_inputs=inputs)
    profile = json.loads((tmp_path / "t" / "profile.json").read_text())
    assert profile and all(s["min"] == s["opt"] == s["max"] for s in profile.values())  # (every shape static)


def test_refusals(unet):
    other = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                  block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                  up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    with pytest.raises(UnsupportedArchitectureError, match="not a denoiser graphprune knows"):
        graphprune.optimize(other, "tomesd")
    with pytest.raises(RecipeError, match="tomesd"):
        graphprune.optimize(unet, "tome")
    with pytest.raises(ScheduleError, match="0.75"):
        graphprune.optimize(unet, "tomesd", ratio=0.9)
    with pytest.raises(ScheduleError):
        graphprune.optimize(unet, "tomesd", ratio=[0.5, 1.2])
    with pytest.raises(UnsupportedArchitectureError, match="not a denoiser"):
        graphprune.optimize(torch.nn.Linear(3, 3), "tomesd")
    plain = diffusers.UNet2DConditionModel(  # no attention anywhere: no block to reduce
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type=None, cross_attention_dim=8, norm_num_groups=4)
    with pytest.raises(UnsupportedArchitectureError, match="no transformer blocks"):
        graphprune.optimize(plain, "tomesd")
    with pytest.raises(ScheduleError, match="all off"):
        graphprune.optimize(unet, "tomesd", merge_attn=False)


def test_onnx_check_replays_the_graphs_matchings(unet, tmp_path, monkeypatch):
    """The export's parity check runs eager with the exported graph's own matchings (so that near-ties, which two
    runtimes' rounding may decide apart at real scale, do not fail it) and checks those matchings against eager's
    similarities: a graph that merges the least similar sources is refused, and nothing is written."""
    import types

    from graphprune.diffusion import merge

    def normalize(x, dim):  # exported, the similarities pair each token with another's features
        m = torch.nn.functional.normalize(x, dim=dim)
        return m.flip(1) if torch.compiler.is_exporting() else m

    monkeypatch.setattr(merge, "F", types.SimpleNamespace(normalize=normalize))
    with pytest.raises(GraphPruneError, match="from optimal"):
        graphprune.optimize(unet, "tomesd", ratio=0.5, seed=3, target="onnx", output=tmp_path / "d",
                            example_inputs=_unet_inputs())
    assert not (tmp_path / "d").exists()


def test_openvino_check_replays_the_graphs_matchings(unet, tmp_path):
    """The OpenVINO IR is checked as the ONNX graph is: its block calls' matchings are exposed again by name (the ONNX
    graph keeps the tensors, not the outputs) and eager replays them; the IR written has the one output; matchings
    far from optimal under eager's similarities are refused and nothing is written."""
    pytest.importorskip("openvino")
    import openvino

    from graphprune.exporters import denoiser_onnx

    inputs = _unet_inputs()
    onnx_runner = graphprune.optimize(unet, "tomesd", ratio=0.5, seed=3, target="onnx", output=tmp_path / "d",
                                      example_inputs=inputs)
    calls = onnx_runner.meta["checked_calls"] // 2
    names = [f"{k}_{i}" for i in range(calls) for k in ("order", "choice")]
    reduced = graphprune.optimize(unet, "tomesd", ratio=0.5, seed=3)
    step = denoiser_onnx._step(reduced, inputs)
    cells = denoiser_onnx._check_cells(onnx_runner.grids)
    seen = {}

    def check(run):
        outs = run([*denoiser_onnx._split(inputs)[1], *cells])
        seen["outputs"] = len(outs)
        return denoiser_onnx._checked(run, step, inputs, cells, "OpenVINO")

    _, found = denoiser_onnx.export_openvino(tmp_path / "d" / "denoiser.onnx", [], exposed=names, check=check)
    assert seen["outputs"] == 1 + 2 * calls and found["matching_slack"] <= 1e-4 and found["max_abs_diff"] <= 1e-4
    assert len(openvino.Core().read_model(str(tmp_path / "d" / "denoiser.xml")).outputs) == 1

    def reversed_choice(run):  # the worst matching instead of the graph's: refused
        def worse(arrays):
            outs = run(arrays)
            return [outs[0]] + [o.flip(-1) if i % 2 else o for i, o in enumerate(outs[1:])]
        return denoiser_onnx._checked(worse, step, inputs, cells, "OpenVINO")

    (tmp_path / "e").mkdir()
    for name in ("denoiser.onnx", "denoiser.onnx.data"):
        (tmp_path / "e" / name).write_bytes((tmp_path / "d" / name).read_bytes())
    with pytest.raises(GraphPruneError, match="from optimal|differs"):
        denoiser_onnx.export_openvino(tmp_path / "e" / "denoiser.onnx", [], exposed=names, check=reversed_choice)
    assert not (tmp_path / "e" / "denoiser.xml").exists()


def test_onnx_denoiser_matches_eager_and_draws_alike(unet, tmp_path):
    inputs = _unet_inputs()
    onnx = graphprune.optimize(unet, "tomesd", ratio=0.5, seed=3, target="onnx", output=tmp_path / "d",
                               example_inputs=inputs)
    assert onnx.max_abs_diff <= 1e-4
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["denoiser.json", "denoiser.onnx",
                                                                  "denoiser.onnx.data", "denoiser.ort.onnx"]
    import onnx as onnx_lib  # ONNX Runtime's ScatterND with a reduction loses updates to repeated indices with more
    # than one thread (onnxruntime#18048): the merge's additions must export as ScatterElements
    graph = onnx_lib.load(tmp_path / "d" / "denoiser.onnx", load_external_data=False)
    nodes = list(graph.graph.node) + [n for f in graph.functions for n in f.node]
    assert any(n.op_type == "ScatterElements" for n in nodes)
    assert not [n for n in nodes if n.op_type == "ScatterND" and any(a.name == "reduction" and a.s != b"none"
                                                                     for a in n.attribute)]
    assert [o.name for o in graph.graph.output] == ["output"]  # (the matchings were outputs for the check only)
    # what ONNX Runtime runs (and the check ran): every attention fused, reading the portable graph's weights file
    fused = onnx_lib.load(tmp_path / "d" / "denoiser.ort.onnx", load_external_data=False)
    kinds = [n.op_type for n in fused.graph.node]
    assert "Softmax" not in kinds and "MultiHeadAttention" not in [n.op_type for n in nodes]
    assert kinds.count("MultiHeadAttention") == 8 and [o.name for o in fused.graph.output] == ["output"]
    assert {e.value for t in fused.graph.initializer for e in t.external_data if e.key == "location"} == {
        "denoiser.onnx.data"}
    meta = json.loads((tmp_path / "d" / "denoiser.json").read_text())
    assert meta["fused_attention"] == 8  # (4 transformer blocks: self- and cross-attention)
    assert meta["checked_calls"] == 2 * len(meta["cells"]) > 0 and meta["matching_slack"] <= 1e-4 and meta["near_ties"] == 0
    eager = graphprune.optimize(unet, "tomesd", ratio=0.5, seed=3)
    with torch.no_grad():
        for t in (700.0, 300.0):  # two steps: the cells advance alike
            step = _unet_inputs(t=t)
            assert (onnx(**step) - eager(**step).sample).abs().max() <= 1e-4
        one = _unet_inputs(batch=1)  # the exported batch is dynamic
        assert (onnx(**one) - eager(**one).sample).abs().max() <= 1e-4
    from graphprune.exporters.denoiser_onnx import OnnxDenoiser  # (a runner that hands its memory back after a step)
    assert torch.equal(OnnxDenoiser(tmp_path / "d", release_memory=True)(**step), OnnxDenoiser(tmp_path / "d")(**step))
    with pytest.raises(GraphPruneError, match="example_inputs"):
        graphprune.optimize(unet, "tomesd", target="onnx", output=tmp_path / "e")
    with pytest.raises(GraphPruneError, match="timestep"):  # a Python number would be baked into the graph
        graphprune.optimize(unet, "tomesd", target="onnx", output=tmp_path / "e",
                            example_inputs={**inputs, "timestep": 700})
    with pytest.raises(GraphPruneError, match="one ratio"):
        graphprune.optimize(unet, "tomesd", ratio=[0.5, 0.2], target="onnx", output=tmp_path / "e",
                            example_inputs=inputs)
    assert not (tmp_path / "e").exists()


@pytest.mark.slow  # (three exports, about a minute: CI runs it with the slow tests)
def test_denoiser_deployment_targets(unet, tmp_path):
    """openvino: the IR from the checked ONNX denoiser, within 1e-4 of eager; trt: the engine's build files (the cells
    at their one shape, the batch dynamic), no engine claimed; triton: a repository entry whose config Triton's own
    schema parses and whose inputs are the ONNX graph's (no server-side batching: one cell draw per call)."""
    from google.protobuf import text_format

    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    pytest.importorskip("openvino")
    inputs = _unet_inputs()
    eager = graphprune.optimize(unet, "tomesd", ratio=0.5, seed=3)
    ov = graphprune.optimize(unet, "tomesd", ratio=0.5, seed=3, target="openvino", output=tmp_path / "ov",
                             example_inputs=inputs)
    assert {"denoiser.xml", "denoiser.bin", "denoiser.onnx"} <= {p.name for p in (tmp_path / "ov").iterdir()}
    with torch.no_grad():
        for t in (700.0, 300.0):
            step = _unet_inputs(t=t)
            assert (ov(**step) - eager(**step).sample).abs().max() <= 1e-4

    trt = graphprune.optimize(unet, "tomesd", ratio=0.5, target="trt", output=tmp_path / "trt", example_inputs=inputs)
    profile = json.loads((tmp_path / "trt" / "profile.json").read_text())
    assert profile["sample"]["min"][0] == 1 and profile["sample"]["max"][0] >= 2
    cells = {k: v for k, v in profile.items() if k.startswith("cells_")}
    assert cells and all(v["min"] == v["max"] == [8, 8] for v in cells.values())  # 16×16 latent, 2×2 cells
    assert "--onnx=denoiser.onnx" in (tmp_path / "trt" / "build_engine.sh").read_text()
    assert trt.build.engine is None and "no engine was built" in trt.build.note

    graphprune.optimize(unet, "tomesd", ratio=0.5, target="triton", output=tmp_path / "repo" / "unet",
                        example_inputs=inputs)
    cfg = text_format.Parse((tmp_path / "repo" / "unet" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")
    assert cfg.default_model_filename == "denoiser.onnx"
    assert (tmp_path / "repo" / "unet" / "1" / "denoiser.onnx").is_file()
    import onnx

    graph = onnx.load(str(tmp_path / "repo" / "unet" / "1" / "denoiser.onnx"), load_external_data=False).graph
    assert [i.name for i in cfg.input] == [i.name for i in graph.input]
    assert [i.name for i in cfg.input][:3] == ["sample", "timestep", "encoder_hidden_states"]
    assert list(cfg.input[0].dims) == [-1, 4, 16, 16] and list(cfg.input[3].dims) == [8, 8]
    with pytest.raises(GraphPruneError, match="needs output"):
        graphprune.optimize(unet, "tomesd", target="openvino", example_inputs=inputs)


def test_torch_compile_gives_the_same_outputs(unet):
    """Compiled (the cell draws stay outside the graph) equals eager over two calls; top-left cells compile whole."""
    inputs = _unet_inputs()
    for use_rand, fullgraph in ((True, False), (False, True)):
        eager = graphprune.optimize(unet, "tomesd", ratio=0.5, seed=3, use_rand=use_rand)
        compiled = torch.compile(graphprune.optimize(unet, "tomesd", ratio=0.5, seed=3, use_rand=use_rand),
                                 fullgraph=fullgraph, backend="aot_eager")
        with torch.no_grad():
            for _ in range(2):
                assert (compiled(**inputs).sample - eager(**inputs).sample).abs().max() <= 1e-5
