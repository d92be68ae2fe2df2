"""optimize(): the user's model is untouched, batching is honest, artifacts reload, bad input is refused."""

import json
import os
import subprocess
import sys

import pytest
import torch

import graphprune
from graphprune.errors import ExportError, GraphPruneError, RecipeError, ScheduleError
from tests.conftest import family, images, tiny


def _snapshot(model):
    return (
        type(model),
        {k: v.clone() for k, v in model.state_dict().items()},
        [(n, m.training, type(m), len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()],
    )


@pytest.mark.parametrize("recipe,opts", [("tome", {"r": 5}), ("evit", {"keep": 0.5})])
def test_input_model_is_unchanged(recipe, opts, tmp_path):
    model = family("deit3_layerscale")
    model.train()  # even a model left in training mode keeps its flags
    model.blocks[1].eval()
    before = _snapshot(model)
    x = images(2)
    with torch.no_grad():
        out_before = model.eval()(x)
    model.train()
    model.blocks[1].eval()
    before = _snapshot(model)
    graphprune.optimize(model, recipe, example_inputs=(x,), **opts)
    graphprune.optimize(model, recipe, target="onnx", output=tmp_path / "m.onnx", example_inputs=(x,), **opts)
    after = _snapshot(model)
    assert after[0] is before[0]
    assert after[2] == before[2]
    for k, v in before[1].items():
        assert torch.equal(v, after[1][k]), k
    assert not torch.nn.modules.module._global_forward_hooks and not torch.nn.modules.module._global_forward_pre_hooks
    with torch.no_grad():
        assert torch.equal(model.eval()(x), out_before)


@pytest.mark.parametrize("recipe,opts", [("tome", {"r": 7}), ("evit", {"keep": 0.4})])
def test_batch_independence_and_batch_one(recipe, opts):
    model = family("vit")
    fast = graphprune.optimize(model, recipe, example_inputs=(images(1),), **opts)  # batch 1 example
    x = images(4)
    with torch.no_grad():
        full = fast(x)
        single = fast(x[2:3])
        other = x.clone()
        other[0] = torch.randn_like(other[0]) * 3
        changed = fast(other)
    torch.testing.assert_close(single[0], full[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(changed[1:], full[1:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(changed[0], full[0])


def test_report_and_save_reload(tmp_path):
    model = family("deit_distilled")
    x = images(2)
    fast = graphprune.optimize(model, "tome", example_inputs=(x,), r=8)
    rep = fast.report
    assert rep.tokens_per_block == [66, 58, 50, 42]
    assert 0.3 < rep.flop_ratio < 1.0
    assert rep.parity["capture"] <= 1e-5
    assert '"flop_ratio"' in rep.to_json()
    path = fast.save(tmp_path / "m.pt2")
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt2"]  # no temporary files left
    again = graphprune.load(path)
    x3 = images(3, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(again(x3), fast(x3))


def test_flops_count_attention():
    """Attention FLOPs are included (FlopCounterMode alone misses SDPA on CPU)."""
    model = tiny("vit_tiny_patch16_224", depth=1, embed_dim=48, num_heads=3)
    rep = graphprune.optimize(model, "tome", example_inputs=(images(2),), r=0).report
    n, c = 65, 48
    linear = 2 * n * (c * 3 * c + c * c + 2 * c * 4 * c)
    attention = 2 * 2 * n * n * c
    patch = 2 * 64 * c * 3 * 16
    head = 2 * c * 10
    assert rep.flops_before == linear + attention + patch + head


@pytest.mark.parametrize("recipe,opts", [
    ("tome", {"r": 5}), ("tome", {"r": 5, "split": "random"}), ("evit", {"keep": 0.5}), ("tps", {"keep": 0.5}),
    ("diffrate", {}), ("pitome", {}), ("ppt", {}), ("atc", {"keep": 0.5}),
])
def test_flops_include_the_reduction_itself(recipe, opts, monkeypatch):
    """The token ops' similarities and merges are counted: without their formulas the count is lower."""
    from graphprune import report

    fast = graphprune.optimize(family("vit"), recipe, example_inputs=(images(2),), **opts)
    attention_only = {k: v for k, v in report._CUSTOM.items() if k is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu}
    monkeypatch.setattr(report, "_CUSTOM", attention_only)
    assert report.count_flops(fast.gm, (images(1),)) < fast.report.flops_after


def test_bad_recipe_and_options():
    model = family("vit")
    x = (images(2),)
    with pytest.raises(RecipeError, match="unknown recipe 'tomee'.*Did you mean 'tome'"):
        graphprune.optimize(model, "tomee", example_inputs=x)
    with pytest.raises(RecipeError, match="no option keep"):
        graphprune.optimize(model, "tome", example_inputs=x, keep=0.5)
    with pytest.raises(ScheduleError, match=">= 0"):
        graphprune.optimize(model, "tome", example_inputs=x, r=-1)
    with pytest.raises(ScheduleError, match="5 per-block values but the model has 4 blocks"):
        graphprune.optimize(model, "tome", example_inputs=x, r=[1, 1, 1, 1, 1])
    with pytest.raises(ScheduleError, match="metric must be one of keys, keys_concat, tokens"):
        graphprune.optimize(model, "tome", example_inputs=x, metric="queries")
    for keep in (0.0, 1.5, -0.2):
        with pytest.raises(ScheduleError, match=r"\(0, 1\]"):
            graphprune.optimize(model, "evit", example_inputs=x, keep=keep)
    with pytest.raises(ScheduleError, match="not a block index"):
        graphprune.optimize(model, "evit", example_inputs=x, locations=[7])
    with pytest.raises(GraphPruneError, match="unknown target"):
        graphprune.optimize(model, "tome", target="tflite", example_inputs=x)


def test_mutable_option_defaults_are_per_instance():
    import dataclasses

    from graphprune.recipes.base import Recipe, option

    @dataclasses.dataclass
    class Listy(Recipe):
        ids: list = option([1], "ids")
        table: dict = option({"a": [1]}, "table")

    first, second = Listy(), Listy()
    first.ids.append(2)
    first.table["a"].append(2)
    assert second.ids == [1] and second.table == {"a": [1]}
    assert Listy().options()["ids"] == [1]
    assert ("ids", "[1]", "ids") in Listy.describe_options()


def test_first_line_of_an_error():
    from graphprune.errors import first_line

    assert first_line(RuntimeError("\n  first  \nsecond")) == "first"
    assert first_line(RuntimeError("")) == "RuntimeError"
    assert first_line(KeyError()) == "KeyError"
    assert first_line(ValueError(" \n ")) == "ValueError"


def test_onnx_export_error_without_a_message(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError()

    monkeypatch.setattr(torch.onnx, "export", fail)
    with pytest.raises(ExportError, match="ONNX export failed: RuntimeError"):
        graphprune.optimize(family("vit"), "tome", target="onnx", output=tmp_path / "m.onnx", example_inputs=(images(2),))


def test_wrong_input_shape():
    with pytest.raises(GraphPruneError, match="do not fit the model"):
        graphprune.optimize(family("vit"), "tome", example_inputs=(torch.randn(2, 3, 20, 20),))


FAKE_TENSORRT = """
import json, os
calls = []
class Logger:
    WARNING = 2
    def __init__(self, level): pass
class NetworkDefinitionCreationFlag:
    EXPLICIT_BATCH = 0
class BuilderFlag:
    FP16 = 1
class OnnxParser:
    def __init__(self, network, logger): pass
    num_errors = 0
    def parse_from_file(self, path):
        calls.append(("parse", os.path.basename(path), os.path.exists(path + ".data")))
        return True
class Profile:
    def set_shape(self, name, lo, opt, hi): calls.append(("shape", name, lo, opt, hi))
class Config:
    def set_flag(self, flag): calls.append(("flag", flag))
    def add_optimization_profile(self, profile): calls.append(("profile",))
class Builder:
    def __init__(self, logger): pass
    def create_network(self, flags): calls.append(("network", flags)); return object()
    def create_builder_config(self): return Config()
    def create_optimization_profile(self): return Profile()
    def build_serialized_network(self, network, config):
        with open(os.environ["FAKE_TRT_LOG"], "w") as f:
            json.dump(calls, f)
        return b"engine bytes"
"""


def test_trt_target_writes_the_checked_onnx_and_its_engine_build(tmp_path, monkeypatch):
    from graphprune.exporters import trt

    out = tmp_path / "trt"
    fast = graphprune.optimize(family("vit"), "tome", r=4, target="trt", output=out, example_inputs=(images(2),))
    assert sorted(p.name for p in out.iterdir()) == ["build_engine.py", "build_engine.sh", "model.onnx",
                                                     "model.onnx.data", "profile.json"]
    assert fast.report.parity["onnx"] <= 1e-4 and fast.report.engine is None  # never an engine that was not built
    assert "no engine was built" in fast.report.engine_note
    name = fast.session.get_inputs()[0].name
    profile = json.loads((out / "profile.json").read_text())
    assert profile == {name: {"min": [1, 3, 32, 32], "opt": [2, 3, 32, 32], "max": [32, 3, 32, 32]}}
    sh = (out / "build_engine.sh").read_text()
    assert (f"trtexec --onnx=model.onnx --saveEngine=model.plan --minShapes={name}:1x3x32x32 "
            f"--optShapes={name}:2x3x32x32 --maxShapes={name}:32x3x32x32") in sh
    # the written script builds wherever tensorrt imports: here, a stand-in module that records the builder calls
    fake = tmp_path / "fake"
    (fake / "tensorrt").mkdir(parents=True)
    (fake / "tensorrt" / "__init__.py").write_text(FAKE_TENSORRT)
    log = tmp_path / "calls.json"
    env = {**os.environ, "PYTHONPATH": str(fake), "FAKE_TRT_LOG": str(log)}
    res = subprocess.run([sys.executable, str(out / "build_engine.py")], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert (out / "model.plan").read_bytes() == b"engine bytes"
    calls = json.loads(log.read_text())
    assert ["parse", "model.onnx", True] in calls and ["shape", name, [1, 3, 32, 32], [2, 3, 32, 32], [32, 3, 32, 32]] in calls
    # without TensorRT the script says what to do
    res = subprocess.run([sys.executable, str(out / "build_engine.py")], capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert res.returncode == 2 and "needs TensorRT" in res.stderr
    # where tensorrt imports, optimize builds the engine itself and says so
    monkeypatch.syspath_prepend(str(fake))
    monkeypatch.setenv("FAKE_TRT_LOG", str(log))
    try:
        built = graphprune.optimize(family("vit"), "tome", r=4, target="trt", output=tmp_path / "b",
                                    example_inputs=(images(2),))
        assert trt.tensorrt_available()
    finally:
        sys.modules.pop("tensorrt", None)  # (the stand-in must not outlive this test)
    assert built.report.engine == str(tmp_path / "b" / "model.plan") and (tmp_path / "b" / "model.plan").is_file()


def test_onnx_needs_output_and_a_writable_place(tmp_path):
    with pytest.raises(GraphPruneError, match="output"):
        graphprune.optimize(family("vit"), "tome", target="onnx", example_inputs=(images(2),))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ExportError, match="cannot create"):
        graphprune.optimize(family("vit"), "tome", target="onnx", output=blocker / "sub" / "m.onnx", example_inputs=(images(2),))


def test_failed_onnx_validation_leaves_nothing(tmp_path, monkeypatch):
    import graphprune.exporters.onnx as onnx_exporter

    monkeypatch.setattr(onnx_exporter, "max_abs_diff", lambda a, b: 1.0)
    with pytest.raises(ExportError, match="nothing was written"):
        graphprune.optimize(family("vit"), "tome", target="onnx", output=tmp_path / "m.onnx", example_inputs=(images(2),))
    assert os.listdir(tmp_path) == []


def test_openvino_target_writes_the_checked_ir(tmp_path, monkeypatch):
    """target="openvino": the IR converted from the checked ONNX model, compiled for the CPU and within 1e-4 of eager
    (other batch sizes too); a failed conversion leaves nothing behind."""
    pytest.importorskip("openvino")
    from graphprune.errors import ExportError

    model, x = family("vit"), images(2)
    out = tmp_path / "ov"
    fast = graphprune.optimize(model, "tome", r=4, target="openvino", output=out, example_inputs=(x,))
    assert sorted(p.name for p in out.iterdir()) == ["model.bin", "model.onnx", "model.onnx.data", "model.xml"]
    assert fast.report.parity["openvino"] <= 1e-4 and fast.report.artifact == str(out / "model.xml")
    eager = graphprune.optimize(model, "tome", r=4, example_inputs=(x,))
    more = images(3)
    with torch.no_grad():
        expected = eager(more)
    assert (fast(more) - expected).abs().max() <= 1e-4
    from graphprune.exporters.openvino import OpenVinoModel

    threads = torch.get_num_threads()  # the runtimes run on PyTorch's thread count (what a benchmark's --threads sets)
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert OpenVinoModel(out / "model.xml").compiled.get_property("INFERENCE_NUM_THREADS") == n
            assert graphprune.OnnxModel(out / "model.onnx").session.get_session_options().intra_op_num_threads == n
    finally:
        torch.set_num_threads(threads)
    import openvino

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operation")

    monkeypatch.setattr(openvino, "convert_model", broken)
    with pytest.raises(ExportError, match="OpenVINO could not convert"):
        graphprune.optimize(model, "tome", r=4, target="openvino", output=tmp_path / "bad", example_inputs=(x,))
    assert not any((tmp_path / "bad").iterdir())


def test_triton_target_writes_a_model_repository_entry(tmp_path):
    """target="triton", output="repo/NAME": NAME/1/model.onnx (checked) and NAME/config.pbtxt, which Triton's own
    schema parses and whose inputs and outputs are the ONNX model's (batch axis left out)."""
    text_format = pytest.importorskip("google.protobuf.text_format")
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from graphprune.errors import ExportError

    fast = graphprune.optimize(family("vit"), "tome", r=4, target="triton", output=tmp_path / "repo" / "vit",
                               example_inputs=(images(2),))
    folder = tmp_path / "repo" / "vit"
    assert fast.report.artifact == str(folder)
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == \
        ["1/model.onnx", "1/model.onnx.data", "config.pbtxt"]
    cfg = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert cfg.name == "vit" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 32
    assert cfg.dynamic_batching.max_queue_delay_microseconds > 0 and cfg.instance_group[0].kind == \
        model_config_pb2.ModelInstanceGroup.KIND_CPU
    for entries, args in ((cfg.input, fast.session.get_inputs()), (cfg.output, fast.session.get_outputs())):
        assert [(e.name, list(e.dims), model_config_pb2.DataType.Name(e.data_type)) for e in entries] == \
            [(a.name, [d if isinstance(d, int) else -1 for d in a.shape[1:]], "TYPE_FP32") for a in args]
    with pytest.raises(ExportError, match="repo/NAME"):
        graphprune.optimize(family("vit"), "tome", r=4, target="triton", output=tmp_path / "x.onnx",
                            example_inputs=(images(2),))
