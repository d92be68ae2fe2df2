"""graphprune-cli on decoder LLMs: export (eager schedule, ONNX) and bench with cache recipes."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

import graphprune
from graphprune.cli import app
from tests.test_kv import tiny

runner = CliRunner()


def saved_llm(tmp_path):
    folder = tmp_path / "llm"
    tiny().save_pretrained(folder)
    return folder


def test_cli_exports_a_decoder_to_onnx_and_to_a_schedule(tmp_path):
    folder = saved_llm(tmp_path)
    res = runner.invoke(app, ["export", str(folder), "--recipe", "h2o", "-O", "budget=12", "--target", "onnx",
                              "--prompt-len", "20", "--new-tokens", "8", "-o", str(tmp_path / "onnx")])
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "onnx" / "decoder.json").read_text())
    assert meta["prompt_len"] == 20 and meta["capacities"] == [12, 12, 12]
    report = json.loads((tmp_path / "onnx" / "report.json").read_text())
    assert report["recipe"] == "h2o" and report["kv_heads"] == 2
    res = runner.invoke(app, ["export", str(folder), "--recipe", "snapkv", "-O", "budget=0.5", "-o", str(tmp_path / "eager")])
    assert res.exit_code == 0, res.output
    fast = graphprune.optimize(tiny(), schedule=tmp_path / "eager" / "schedule.json")
    assert fast.report.recipe == "snapkv" and fast.report.options["budget"] == 0.5


def test_cli_benches_cache_recipes_on_text(tmp_path):
    folder = saved_llm(tmp_path)
    res = runner.invoke(app, ["bench", str(folder), "--recipe", "streaming_llm", "-O", "sinks=2", "--sweep", "budget=1.0,8",
                              "--prompt-len", "24", "--new-tokens", "6", "--batch", "2", "--rounds", "1", "--warmup", "0",
                              "--json", str(tmp_path / "b.json"), "--table", str(tmp_path / "b.md")])
    assert res.exit_code == 0, res.output
    results = json.loads((tmp_path / "b.json").read_text())["results"]
    full, small = results
    assert full["fidelity"]["top1_agreement"] == 1.0 and full["fidelity"]["cache_ratio"] == 1.0
    assert small["fidelity"]["cache_ratio"] < 0.5
    assert "ppl ratio" in (tmp_path / "b.md").read_text()


def test_cli_decoder_errors(tmp_path):
    folder = saved_llm(tmp_path)
    res = runner.invoke(app, ["export", str(folder), "--recipe", "tome", "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and "decoder LLMs take a KV-cache recipe" in " ".join(res.output.split())
    res = runner.invoke(app, ["export", str(tmp_path / "missing.gguf"), "--recipe", "h2o", "-o", str(tmp_path / "y")])
    assert res.exit_code == 2 and "no such file" in res.output
    res = runner.invoke(app, ["bench", str(folder), "--recipe", "h2o", "--data", str(tmp_path / "none.txt")])
    assert res.exit_code == 2 and "no such text file" in res.output


def test_graphprune_imports_without_transformers():
    code = ("import sys; sys.modules['transformers'] = None; import graphprune; "
            "assert 'snapkv' in graphprune.list_recipes('cache'); print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_cli_benches_lazyllm_and_saves_its_schedule(tmp_path):
    folder = saved_llm(tmp_path)
    res = runner.invoke(app, ["bench", str(folder), "--recipe", "lazyllm", "-O", "start=0", "--sweep", "rate=0.0,0.3",
                              "--prompt-len", "24", "--new-tokens", "6", "--batch", "2", "--rounds", "1", "--warmup", "0",
                              "--json", str(tmp_path / "b.json")])
    assert res.exit_code == 0, res.output
    zero, pruned = json.loads((tmp_path / "b.json").read_text())["results"]
    assert zero["fidelity"]["top1_agreement"] == 1.0 and zero["fidelity"]["perplexity_ratio"] == 1.0
    assert pruned["fidelity"]["kl"] > 0
    res = runner.invoke(app, ["export", str(folder), "--recipe", "lazyllm", "-O", "rate=0.2", "-o", str(tmp_path / "eager")])
    assert res.exit_code == 0, res.output
    fast = graphprune.optimize(tiny(), schedule=tmp_path / "eager" / "schedule.json")
    assert fast.report.recipe == "lazyllm" and fast.report.options["rate"] == 0.2
