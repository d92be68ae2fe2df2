"""``graphprune.optimize``: capture → analyze → plan → rewrite → lower → verify → report."""

from __future__ import annotations

from pathlib import Path

import torch

from graphprune.calls import CallMap, example_tuple
from graphprune.capture import capture
from graphprune.errors import GraphPruneError, UnsupportedArchitectureError, first_line
from graphprune.diffusion import is_diffusion, optimize_diffusion
from graphprune.exporters.eager import OptimizedModel
from graphprune.exporters.files import check_writable
from graphprune.exporters.decoder_onnx import export_decoder_onnx
from graphprune.exporters.onnx import export_onnx, length_checks
from graphprune.buckets import longest_example, one_graph, optimize_buckets
from graphprune.exporters import triton
from graphprune.exporters.openvino import export_openvino
from graphprune.exporters.trt import write_trt_build
from graphprune.kv import input_ids, is_decoder_lm, optimize_decoder
from graphprune.kv.compose import compose
from graphprune.kv.policy import When
from graphprune.passes import remove_markers
from graphprune.patterns import analyze
from graphprune.recipes import get_recipe
from graphprune.report import Report, count_flops
from graphprune.schedule.files import resolve

TARGETS = ("eager", "onnx", "trt", "openvino", "triton")


def default_example_inputs(model: torch.nn.Module) -> tuple:
    """Two images of the size the model was built for (timm's ``pretrained_cfg`` or ``patch_embed``, or a Hugging
    Face vision encoder's ``config.image_size`` and ``num_channels``)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size")
    config = getattr(model, "config", None)
    if size is None and isinstance(getattr(config, "num_channels", None), int) \
            and getattr(config, "image_size", None) is not None:
        side = config.image_size
        size = (config.num_channels, *((side, side) if isinstance(side, int) else side))
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None) is not None:
        chans = getattr(getattr(pe, "proj", None), "in_channels", 3)
        size = (chans, *pe.img_size)
    if size is None:
        raise GraphPruneError("cannot tell the model's input shape: pass example_inputs=(tensor, ...)")
    return (torch.randn(2, *size),)


def _batch1(inputs: tuple) -> tuple:
    return tuple(t[:1] if isinstance(t, torch.Tensor) and t.dim() > 0 else t for t in inputs)


def _optimize_decoder(model, policy, target: str, output, example_inputs, max_new_tokens: int):
    """Decoder LLMs: an evicting copy (eager), or prefill/decode ONNX graphs in the folder ``output``."""
    if target not in ("eager", "onnx"):
        raise GraphPruneError(f"decoder LLMs lower to target='eager' or 'onnx', not '{target}' (TensorRT: export to "
                              "ONNX and build the engine from decode.onnx)")
    if target == "onnx" and output is None:
        raise GraphPruneError("target='onnx' needs output='folder' (prefill.onnx and decode.onnx are written there)")
    fast = optimize_decoder(model, policy)
    if target == "eager":
        return fast
    if fast.graphprune.info.media:  # a vision-language model: its image side, and its language model with a cache
        # policy of a fixed budget
        from graphprune.exporters.vision_onnx import export_image_reducer, export_vlm_onnx

        if policy.evicts is not When.NEVER or policy.prunes_rows:
            return export_vlm_onnx(fast, output, max_new_tokens)
        pixels = example_inputs.get("pixel_values") if isinstance(example_inputs, dict) else example_inputs
        return export_image_reducer(fast, output, pixels)
    prompt_len = 128 if example_inputs is None else input_ids(example_inputs).shape[-1]
    return export_decoder_onnx(fast, output, prompt_len=prompt_len, max_new_tokens=max_new_tokens)


def optimize(model: torch.nn.Module, recipe: str | list | None = None, target: str = "eager", example_inputs=None, output=None,
             schedule=None, **options):
    """Apply a token-reduction recipe to ``model`` and lower the result to ``target``.

    Returns an :class:`OptimizedModel` (``target="eager"``) or an :class:`OnnxModel`
    (``target="onnx"``, written to ``output``; ``target="trt"``: the same, plus the TensorRT engine build files
    beside it, and the engine itself where ``tensorrt`` imports, see :mod:`graphprune.exporters.trt`; ``target="openvino"``:
    the OpenVINO IR ``model.xml`` / ``.bin`` converted from it, checked on the CPU, see
    :mod:`graphprune.exporters.openvino`; ``target="triton"``, ``output="repo/NAME"``: a Triton model repository entry,
    see :mod:`graphprune.exporters.triton`). Both are callable with the original inputs
    and carry ``.report``. Decoder LLMs (Llama, Qwen2/3, Mistral, Gemma 3, Phi-3) take a KV-cache recipe and
    ``budget=`` (vision-language models also a visual recipe, ``recipe="fastv"``, or both at once,
    ``recipe=["fastv", "snapkv"]``: each option goes to the recipe that has it); they come back as a model with the standard forward and ``generate``
    (``target="eager"``), or as prefill/decode ONNX graphs in the folder ``output``
    (``target="onnx"``; ``max_new_tokens=`` sizes them). ``schedule``: a schedule from :func:`graphprune.tune` (or its JSON
    file) giving the recipe and its per-block options; explicit options override it. ``lengths=[64, 128, ...]``
    (text models): one graph per bucket length, each call padded to the next bucket (:mod:`graphprune.buckets`), or,
    where the recipe works out its counts from the tokens it gets (ToMe), one graph with a symbolic sequence length up
    to the longest: the only form the ONNX targets take. The input model is not modified.
    """
    if target not in TARGETS:
        raise GraphPruneError(f"unknown target '{target}'; choose one of {', '.join(TARGETS)}")
    max_new_tokens = options.pop("max_new_tokens", 64)
    lengths = options.pop("lengths", None)
    if isinstance(recipe, (list, tuple)):  # decoder policies at once, e.g. ["fastv", "snapkv"]
        rec = compose(list(recipe), options)
    else:
        resolved, resolved_options = resolve(recipe, schedule, options)
        rec = get_recipe(resolved, **resolved_options)
    max_tokens = None
    if lengths is not None:  # text models at any length up to the longest (graphprune.buckets)
        if not one_graph(rec):  # one graph per bucket length
            if target != "eager":
                raise GraphPruneError(f"lengths=[...] with target='{target}' exports one graph with a symbolic "
                                      f"sequence length, which '{rec.name}' cannot give (it fixes its token counts "
                                      "when optimized; ToMe's alternate split can): export one length at a time with "
                                      "example_inputs of that length, or use target='eager' for buckets")
            return optimize_buckets(optimize, model, recipe, example_inputs, lengths, {"schedule": schedule, **options})
        example_inputs, max_tokens = longest_example(model, example_inputs, lengths)
    if getattr(rec, "kind", None) == "prompt":  # compresses the prompts of generate (graphprune.prompt)
        if target != "eager":
            raise GraphPruneError(f"'{rec.name}' compresses prompts before the model: target='eager' only (export the "
                                  "model itself separately)")
        return rec.wrap(model)
    if is_diffusion(model) or getattr(rec, "kind", None) == "denoiser":  # UNets, diffusion transformers, pipelines
        return optimize_diffusion(model, rec, target, output, example_inputs)
    if is_decoder_lm(model) or getattr(rec, "kind", None) == "cache":
        return _optimize_decoder(model, rec, target, output, example_inputs, max_new_tokens)
    if target in ("onnx", "trt", "openvino", "triton"):
        if output is None:
            raise GraphPruneError(f"target='{target}' needs output='path/to/model.onnx' (or a folder; triton: "
                                  "'repo/NAME')")
        output = Path(output)
        if target == "triton":
            output, model_dir = triton.model_folder(output)
        elif output.suffix != ".onnx":
            output = output / "model.onnx"
        check_writable(output)
    if example_inputs is None:
        example_inputs = default_example_inputs(model)
    example_inputs = example_tuple(model, example_inputs)

    captured = capture(model, example_inputs, max_tokens)
    graph = analyze(captured)
    rec.check(graph)
    inputs = captured.example_inputs
    one = _batch1(inputs)
    parity = {"capture": captured.max_abs_diff}
    flops_before = count_flops(graph.gm, one)
    tokens = rec.apply(graph)
    remove_markers(graph.gm)
    with torch.no_grad():
        try:
            graph.gm(*inputs)  # the rewritten graph must run
        except Exception as err:  # noqa: BLE001
            raise UnsupportedArchitectureError(
                f"the model does not run with fewer tokens ({first_line(err)}): its blocks depend on a fixed token count, e.g. "
                "rotary position embeddings or other per-position tensors passed to the blocks as keyword arguments"
            ) from err
        flops_after = count_flops(graph.gm, one)
    layout = graph.layout
    report = Report(
        recipe=rec.name, options=rec.options(), tokens_per_block=tokens, flops_before=flops_before,
        flops_after=flops_after, parity=parity,
        layout={"prefix_tokens": layout.prefix, "roles": layout.roles, "pooling": layout.pooling},
    )
    result = OptimizedModel(graph.gm, report, inputs, CallMap(model, inputs), max_tokens)
    if target in ("onnx", "trt", "openvino", "triton"):
        runner, diff = export_onnx(result.gm, inputs, output, max_tokens=max_tokens)
        report.parity["onnx"] = diff
        report.artifact = str(output)
        try:
            if target == "triton":  # the model repository entry: config.pbtxt beside the version folder
                triton.write_config(runner, model_dir)
                report.artifact = str(model_dir)
            if target == "openvino":  # the IR converted from the checked ONNX model, checked again
                with torch.no_grad():
                    cases = [(case, result.gm(*case)) for case in length_checks(inputs, max_tokens)]
                runner, diff = export_openvino(output, cases, max_tokens=max_tokens)
                report.parity["openvino"] = diff
                report.artifact = str(runner.path)
        except Exception:
            for written in (output, output.with_name(output.name + ".data")):
                written.unlink(missing_ok=True)  # (nothing half-written stays behind)
            raise
        if target == "trt":  # the checked ONNX model plus its engine build (run here only where TensorRT imports)
            names = [i.name for i in runner.session.get_inputs()]
            shapes = [tuple(t.shape) for t in inputs if isinstance(t, torch.Tensor)]
            tokens = {i.name for i in runner.session.get_inputs() if len(i.shape) > 1 and not isinstance(i.shape[1], int)}
            build = write_trt_build(output, dict(zip(names, shapes)), tokens=tokens)  # (none where the length is fixed)
            report.engine = None if build.engine is None else str(build.engine)
            report.engine_note = build.note
        runner.report = report
        return runner
    return result
