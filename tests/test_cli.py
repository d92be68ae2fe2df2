"""graphprune-cli end to end, and its refusals of bad input."""

import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from graphprune.cli import app
from tests.conftest import family

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def pickled(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "vit.pt"
    torch.save(family("vit"), path)
    return path


def test_export_onnx_from_pickle(pickled, tmp_path):
    out = tmp_path / "out"
    res = _run("export", pickled, "--trust-pickle", "--recipe", "tome", "--r", "6", "--target", "onnx", "-o", out, "--input-size", "3,32,32")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.data", "report.json"]
    rep = json.loads((out / "report.json").read_text())
    assert rep["tokens_per_block"] == [65, 59, 53, 47] and rep["parity"]["onnx"] <= 1e-4
    assert "tokens in" in res.output and "GFLOPs" in res.output


def test_export_eager_from_pt2_and_timm_name(pickled, tmp_path):
    import graphprune

    model = torch.load(pickled, weights_only=False)
    first = graphprune.optimize(model, "tome", r=0, example_inputs=(torch.randn(2, 3, 32, 32),))
    pt2 = first.save(tmp_path / "base.pt2")
    res = _run("export", pt2, "--recipe", "evit", "--keep", "0.5", "--locations", "1,2", "-o", tmp_path / "a", "--input-size", "3,32,32")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "a" / "model.pt2").is_file()
    assert json.loads((tmp_path / "a" / "report.json").read_text())["tokens_per_block"] == [65, 65, 34, 19]  # 1 + ceil(0.5·64) + 1, 1 + ceil(0.5·33) + 1


def test_weights_option(tmp_path):
    import timm
    from safetensors.torch import save_file

    model = timm.create_model("test_vit", pretrained=False)
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    res = _run("export", "test_vit", "--weights", tmp_path / "w.safetensors", "--recipe", "tome", "--r", "2", "-o", tmp_path / "o")
    assert res.exit_code == 0, res.output
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a tensor file")
    res = _run("export", "test_vit", "--weights", bad, "--recipe", "tome", "-o", tmp_path / "o2")
    assert res.exit_code == 2 and "cannot read weights" in res.output


def test_error_without_a_message_is_still_one_clear_error(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise ValueError()

    (tmp_path / "w.pt").write_bytes(b"")
    monkeypatch.setattr(torch, "load", fail)
    res = _run("export", "test_vit", "--weights", tmp_path / "w.pt", "--recipe", "tome", "-o", tmp_path / "o")
    assert res.exit_code == 2, res.output
    assert "cannot read weights" in res.output and "ValueError" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["nosuchmodel_xyz", "--recipe", "tome"], "neither a file nor a timm model"),
        (["test_vit", "--recipe", "nope"], "unknown recipe"),
        (["test_vit", "--recipe", "tome", "--r", "-3"], ">= 0"),
        (["test_vit", "--recipe", "tome", "--r", "1,1,1,1,1,1,1,1,1,1,1,1,1,1"], "per-block values"),
        (["test_vit", "--recipe", "evit", "--keep", "1.5"], "(0, 1]"),
        (["test_vit", "--recipe", "evit", "--keep", "0"], "(0, 1]"),
        (["test_vit", "--recipe", "tome", "--input-size", "3,20,20"], "do not fit the model"),
    ],
)
def test_bad_input_is_one_clear_error(args, message, tmp_path):
    out = tmp_path / "out"
    res = _run("export", *args, "-o", out)
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split())
    assert "Traceback" not in res.output
    assert not out.exists()  # nothing half-written: not even the empty output folder


def test_export_trt_writes_the_engine_build_and_says_no_engine_was_built(tmp_path):
    out = tmp_path / "trt"
    res = _run("export", "test_vit", "--recipe", "tome", "--r", "2", "--target", "trt", "-o", out)
    assert res.exit_code == 0, res.output
    assert {"model.onnx", "build_engine.sh", "build_engine.py", "profile.json", "report.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "model.plan").exists() and "no engine was built" in " ".join(res.output.split())
    assert json.loads((out / "report.json").read_text())["engine"] is None


def test_pt2_that_is_not_an_exported_program(tmp_path):
    bad = tmp_path / "model.pt2"
    bad.write_bytes(b"this is not a zip archive")
    out = tmp_path / "new" / "out"
    res = _run("export", bad, "--recipe", "tome", "-o", out)
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert "is not an exported program" in text and "miniz" not in text and "Traceback" not in text
    assert not (tmp_path / "new").exists()  # the folders it made on the way are gone too


def test_weights_that_do_not_fit_the_model(tmp_path):
    import timm
    from safetensors.torch import save_file

    state = timm.create_model("test_vit", pretrained=False).state_dict()
    state["extra.weight"] = torch.zeros(2)
    del state["head.weight"]
    save_file(state, tmp_path / "w.safetensors")
    res = _run("export", "test_vit", "--weights", tmp_path / "w.safetensors", "--recipe", "tome", "-o", tmp_path / "o")
    text = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    assert "do not fit test_vit" in text and "1 missing (head.weight)" in text and "1 unexpected (extra.weight)" in text
    assert "Traceback" not in text and not (tmp_path / "o").exists()
    state = timm.create_model("test_vit", pretrained=False).state_dict()
    state["head.bias"] = torch.zeros(3)
    save_file(state, tmp_path / "s.safetensors")
    res = _run("export", "test_vit", "--weights", tmp_path / "s.safetensors", "--recipe", "tome", "-o", tmp_path / "o")
    assert res.exit_code == 2 and "1 of another shape (head.bias (3,)" in " ".join(res.output.split())


def test_folder_without_config_is_not_no_such_file(tmp_path):
    folder = tmp_path / "my_model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"x")
    res = _run("export", folder, "--recipe", "tome", "-o", tmp_path / "o")
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "is a folder without config.json" in text and "no such file" not in text


def test_pickle_needs_explicit_trust(pickled, tmp_path):
    res = _run("export", pickled, "--recipe", "tome", "-o", tmp_path / "o")
    assert res.exit_code == 2
    assert "--trust-pickle" in res.output and "arbitrary code" in " ".join(res.output.split())


def test_unwritable_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = _run("export", "test_vit", "--recipe", "tome", "-o", blocker)
    assert res.exit_code == 2 and "not a folder" in res.output


def test_console_script_lists_recipes():
    res = subprocess.run([sys.executable, "-m", "graphprune.cli", "recipes", "--json"], capture_output=True, text=True, check=True)
    listing = json.loads(res.stdout)
    assert {"tome", "evit"} <= set(listing)
    assert any(opt[0] == "r" for opt in listing["tome"]["options"])
    assert listing["fastv"]["zero"] == {"ratio": 0.0} and listing["fastv"]["acts_on"] == "VLM image tokens"
    assert listing["snapkv"]["acts_on"] == "decoder KV cache" and listing["tome"]["zero"] == {"r": 0}


def test_bench_sweeps_two_recipes(pickled, tmp_path):
    out = tmp_path / "b"
    res = _run("bench", pickled, "--trust-pickle", "--input-size", "3,32,32", "--batch", "2", "--rounds", "1", "--warmup", "0",
               "--recipe", "tome", "--sweep", "r=0:8:8", "--recipe", "evit", "--sweep", "keep=0.5",
               "--json", out / "b.json", "--table", out / "b.md", "--plot", out / "b.png")
    assert res.exit_code == 0, res.output
    data = json.loads((out / "b.json").read_text())
    labels = [r["label"] for r in data["results"]]
    assert labels == ["tome(r=0)", "tome(r=8)", "evit(keep=0.5)"]
    zero = data["results"][0]
    assert zero["flop_ratio"] == 1.0 and zero["fidelity"]["cosine"] > 0.99999 and zero["speedup"] > 0
    assert data["results"][1]["flop_ratio"] < 1.0
    assert "tome(r=8)" in (out / "b.md").read_text() and (out / "b.png").stat().st_size > 1000


def test_bench_single_recipe_json_and_data(pickled, tmp_path):
    import numpy as np

    np.save(tmp_path / "x.npy", torch.randn(3, 3, 32, 32).numpy())
    (tmp_path / "y.txt").write_text("1 2 3")
    res = _run("bench", pickled, "--trust-pickle", "--input-size", "3,32,32", "--batch", "2", "--rounds", "1", "--recipe", "tome",
               "--r", "4", "--data", tmp_path / "x.npy", "--labels", tmp_path / "y.txt", "--json", tmp_path / "o.json")
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "o.json").read_text())
    assert {"speedup", "flop_ratio", "fidelity"} <= set(data) and "accuracy" in data["fidelity"]


def test_export_with_schedule_file(pickled, tmp_path):
    from graphprune.schedule.files import Schedule

    path = Schedule("tome", {"r": [6, 6, 0, 0]}).save(tmp_path / "s.json")
    res = _run("export", pickled, "--trust-pickle", "--schedule", path, "-o", tmp_path / "o", "--input-size", "3,32,32")
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["recipe"] == "tome" and rep["tokens_per_block"] == [65, 59, 53, 53]


@pytest.mark.parametrize("args,message", [
    (["--recipe", "tome", "--recipe", "evit"], "one --sweep each"),
    (["--recipe", "tome", "--sweep", "r=1:2:1", "--sweep", "r=3"], "one --sweep per --recipe"),
    (["--recipe", "tome", "--sweep", "r=1:2"], "START:STOP:STEP"),
    (["--recipe", "tome", "--sweep", "r=-1,2"], ">= 0"),
    (["--recipe", "nope"], "unknown recipe"),
    ([], "--recipe NAME or --schedule FILE"),
    (["--recipe", "tome", "--target", "trt"], "unknown bench target"),
])
def test_bench_bad_input_is_one_clear_error(args, message):
    res = _run("bench", "test_vit", *args)
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split())


def test_tune_writes_a_schedule_that_export_takes(pickled, tmp_path):
    res = _run("tune", pickled, "--trust-pickle", "--input-size", "3,32,32", "--batch", "4", "--rounds", "1",
               "--latency-ms", "10000", "--cache-dir", tmp_path / "cache", "-O", "metric=tokens", "-o", tmp_path / "s.json")
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["format"] == "graphprune-schedule" and saved["recipe"] == "tome" and len(saved["options"]["r"]) == 4
    assert saved["options"]["metric"] == "tokens"  # a fixed option is kept with the tuned schedule
    assert "measured" in res.output and list((tmp_path / "cache").glob("*.json"))
    assert "latency table" in res.output and "(profiled now)" in " ".join(res.output.split())  # says which table
    res = _run("export", pickled, "--trust-pickle", "--schedule", tmp_path / "s.json", "-o", tmp_path / "o", "--input-size", "3,32,32")
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("args,message", [
    (["--speedup", "1.5", "--latency-ms", "3"], "one goal"),
    ([], "one goal"),
    (["--speedup", "1.5", "--recipe", "evit"], "has none"),
    (["--speedup", "1.5", "--recipe", "tomee"], "unknown recipe"),
    (["--speedup", "1.5", "-O", "r=3"], "other options only"),
    (["--speedup", "1.5", "-O", "metric=queries"], "metric must be one of"),
    (["--speedup", "1.5", "--data", "no_such_calibration.npy"], "no such data"),  # after the output folder is made
])
def test_tune_bad_input_is_one_clear_error(args, message, tmp_path):
    res = _run("tune", "test_vit", *args, "-o", tmp_path / "new" / "s.json")
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split())
    assert not (tmp_path / "new").exists()  # nothing left behind, not even the folder


@pytest.mark.slow  # (the API test covers the path; this one the command line / runtime)
def test_export_openvino_writes_the_ir(tmp_path):
    pytest.importorskip("openvino")
    out = tmp_path / "ov"
    res = _run("export", "test_vit", "--recipe", "tome", "--r", "2", "--target", "openvino", "-o", out)
    assert res.exit_code == 0, res.output
    assert {"model.onnx", "model.xml", "model.bin", "report.json"} <= {p.name for p in out.iterdir()}
    report = json.loads((out / "report.json").read_text())
    assert report["artifact"] == str(out / "model.xml") and report["parity"]["openvino"] <= 1e-4


@pytest.mark.slow  # (the API test covers the path; this one the command line / runtime)
def test_export_triton_writes_a_repository_named_after_the_model(tmp_path):
    pytest.importorskip("tritonclient.grpc.model_config_pb2")
    res = _run("export", "test_vit", "--recipe", "tome", "--r", "2", "--target", "triton", "-o", tmp_path / "repo")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "repo" / "test_vit" / "config.pbtxt").is_file()
    assert (tmp_path / "repo" / "test_vit" / "1" / "model.onnx").is_file()


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """A tiny BERT and a tiny ViT saved as Hugging Face model folders (config.json + safetensors)."""
    from tests.conftest import HF

    root = tmp_path_factory.mktemp("hf")
    models = {key: HF[key]() for key in ("bert", "vit")}
    for key, model in models.items():
        model.save_pretrained(root / key)
    return root, models


def test_export_a_text_encoder_folder_at_every_length_up_to_the_longest(hf_folders, tmp_path):
    """A BERT folder exports with ToMe as one ONNX graph for 2 to 32 tokens (--lengths 16,32), equal to the model
    optimized in Python with lengths=[16, 32]; a recipe that fixes its counts exports one length, and is refused
    several."""
    import graphprune

    root, models = hf_folders
    out = tmp_path / "bert"
    res = _run("export", root / "bert", "--recipe", "tome", "--r", "3", "--target", "onnx", "--lengths", "32,16", "-o", out)
    assert res.exit_code == 0, res.output
    assert "2 to 32 tokens" in res.output
    onnx = graphprune.OnnxModel(out / "model.onnx")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 100, (2, 32), generator=g)
    fast = graphprune.optimize(models["bert"], "tome", r=3, example_inputs=(ids, torch.ones_like(ids)), lengths=[16, 32])
    for n in (5, 32):
        x, m = ids[:, :n], torch.ones_like(ids[:, :n])
        m[1, n - 2:] = 0
        got, expected = onnx(x, m), fast(x, m)
        assert got[0].shape == (2, n, 48)
        assert (torch.as_tensor(got[0]) - expected.last_hidden_state).abs().max() <= 1e-4
    res = _run("export", root / "bert", "--recipe", "evit", "--keep", "0.5", "--lengths", "16,32", "-o", tmp_path / "e")
    assert res.exit_code == 2 and "one --lengths value" in res.output and not (tmp_path / "e").exists()
    res = _run("export", root / "bert", "--recipe", "evit", "--keep", "0.5", "--lengths", "24", "-o", tmp_path / "e")
    assert res.exit_code == 0, res.output
    assert "it takes 24 tokens" in res.output
    assert json.loads((tmp_path / "e" / "report.json").read_text())["tokens_per_block"][0] == 24
    res = _run("export", root / "bert", "--recipe", "tome", "--r", "2", "-o", tmp_path / "t")  # default: 128, or the
    assert res.exit_code == 0 and "2 to 64 tokens" in res.output, res.output  # model's longest (64) if shorter
    res = _run("export", root / "bert", "--recipe", "tome", "--lengths", "65", "-o", tmp_path / "t2")
    assert res.exit_code == 2 and "at most 64 tokens" in res.output


def test_export_an_image_encoder_folder(hf_folders, tmp_path):
    """A Hugging Face ViT folder exports at its config's image size; --lengths is for text models."""
    root, _ = hf_folders
    res = _run("export", root / "vit", "--recipe", "tome", "--r", "4", "-o", tmp_path / "vit")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "vit" / "report.json").read_text())["tokens_per_block"] == [65, 61, 57, 53]
    res = _run("export", root / "vit", "--recipe", "tome", "--lengths", "16", "-o", tmp_path / "v2")
    assert res.exit_code == 2 and "--lengths is for text models" in res.output and not (tmp_path / "v2").exists()
