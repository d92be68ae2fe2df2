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
        (["test_vit", "--recipe", "tome", "--target", "trt"], "TensorRT"),
    ],
)
def test_bad_input_is_one_clear_error(args, message, tmp_path):
    out = tmp_path / "out"
    res = _run("export", *args, "-o", out)
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split())
    assert "Traceback" not in res.output
    assert not out.exists() or list(out.iterdir()) == []  # nothing half-written


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
