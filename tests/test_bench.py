"""graphprune.bench: timing harness, memory, fidelity, sweeps; saved schedules."""

import json

import pytest
import torch

import graphprune
from graphprune import bench as gb
from graphprune.errors import GraphPruneError, ScheduleError
from graphprune.schedule.files import Schedule, load_schedule
from tests.conftest import family, images


@pytest.mark.parametrize("text,name,values", [
    ("r=0:20:5", "r", [0, 5, 10, 15, 20]),
    ("r=8:0:4", "r", [8, 4, 0]),
    ("keep=1.0:0.4:0.2", "keep", [1.0, 0.8, 0.6, 0.4]),
    ("keep=0.5:0.8:0.1", "keep", [0.5, 0.6, 0.7, 0.8]),
    ("r=4,8,13", "r", [4, 8, 13]),
])
def test_parse_range(text, name, values):
    assert gb.parse_range(text) == (name, values)
    assert all(type(v) is type(values[0]) for v in gb.parse_range(text)[1])


@pytest.mark.parametrize("text", ["r", "=1:2:1", "r=1:2", "r=1:5:0", "r=a:b:c"])
def test_parse_range_refuses_bad_input(text):
    with pytest.raises(GraphPruneError, match="sweep"):
        gb.parse_range(text)


def test_fidelity_measures():
    ref = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    same = gb.fidelity(ref, ref.clone(), logits=True, labels=[0, 0])
    assert same["cosine"] == pytest.approx(1.0) and same["kl"] == pytest.approx(0.0, abs=1e-7)
    assert same["top1_agreement"] == 1.0 and same["accuracy"] == same["baseline_accuracy"] == 0.5
    out = torch.tensor([[2.0, 0.0, 0.0], [1.0, 0.0, 0.0]])  # second sample: orthogonal, other class
    f = gb.fidelity(ref, out, logits=True, labels=[0, 0])
    assert f["cosine"] == pytest.approx(0.5) and f["top1_agreement"] == 0.5 and f["accuracy"] == 1.0
    p, q = ref[1].softmax(-1), out[1].softmax(-1)
    assert f["kl"] == pytest.approx(float((p * (p / q).log()).sum()) / 2, rel=1e-5)
    tokens = torch.randn(2, 5, 4)
    assert gb.fidelity(tokens, -tokens)["cosine"] == pytest.approx(-1.0)  # per token, along the channels
    with pytest.raises(GraphPruneError, match="differ in shape"):
        gb.fidelity(tokens, tokens[:, :3])


def test_peak_memory_with_a_dead_weak_proxy_alive():
    """A weakref.proxy whose object is gone (libraries leave them about) does not stop the count: isinstance on it
    raises ReferenceError."""
    import weakref

    class Thing:
        pass

    thing = Thing()
    proxy = weakref.proxy(thing)
    del thing
    assert gb.peak_memory(lambda t: (t + 1).sum(), (torch.zeros(250_000),)) >= 1_000_000
    del proxy


def test_peak_memory_counts_live_activations():
    x = torch.zeros(250_000)  # 1 MB, allocated before: not counted

    def f(t):
        a = t + 1  # 1 MB
        b = a * 2  # 1 MB, a still alive
        del a
        c = b - 1  # 1 MB, a freed: peak stays 2 MB
        return c.sum()

    peak = gb.peak_memory(f, (x,))
    assert 2_000_000 <= peak < 2_000_100


def _result(recipe, speedup, cosine, **kw):
    return gb.BenchResult(recipe=recipe, options=kw, target="eager", batch=1, baseline_ms=10.0, latency_ms=10.0 / speedup,
                          speedup=speedup, throughput=0.0, baseline_throughput=0.0, flop_ratio=1.0, tokens_per_block=[],
                          fidelity={"cosine": cosine})


def test_pareto_front():
    a, b, c, d = _result("tome", 1.0, 1.0), _result("tome", 1.5, 0.99), _result("evit", 1.4, 0.98), _result("evit", 2.0, 0.9)
    assert gb.pareto_front([a, b, c, d]) == [d, b, a]  # c is beaten by b on both


def test_sweep_on_a_tiny_model(tmp_path):
    model = family("vit")
    results = gb.sweep(model, [("tome", {"r": 0}), ("tome", {"r": 8}), ("evit", {"keep": 0.5})], (images(4),),
                       data=[(images(4, seed=s),) for s in (2, 3)], labels=torch.zeros(8, dtype=torch.long),
                       rounds=2, warmup=1, progress=False)
    zero, tome, evit = results
    assert zero.fidelity["cosine"] == pytest.approx(1.0, abs=1e-6) and zero.fidelity["top1_agreement"] == 1.0
    assert zero.flop_ratio == pytest.approx(1.0) and tome.flop_ratio < 0.8 and evit.flop_ratio < 0.9
    assert tome.fidelity["cosine"] < 1.0 and "accuracy" in tome.fidelity and "kl" in tome.fidelity
    assert tome.tokens_per_block == [65, 57, 49, 41]
    for r in results:
        assert r.baseline_ms > 0 and r.speedup == pytest.approx(r.baseline_ms / r.latency_ms)
        assert r.peak_memory_mb > 0 and r.baseline_peak_memory_mb > 0
    assert tome.peak_memory_mb < zero.peak_memory_mb  # fewer tokens, fewer live activations
    json.dumps([r.to_dict() for r in results])
    png = gb.plot(results, tmp_path / "front.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "★" in gb.markdown(results)


def test_bench_onnx_target_compares_runtimes_alike(tmp_path):
    model = family("vit")
    r = gb.bench(model, "tome", images(2), r=6, target="onnx", rounds=1, warmup=0, progress=False, workdir=tmp_path)
    assert r.target == "onnx" and r.options == {"r": 6} and r.peak_memory_mb is None
    assert (tmp_path / "baseline" / "model.onnx").is_file() and (tmp_path / "variant0" / "model.onnx").is_file()
    assert 0.9 < r.fidelity["cosine"] < 1.0


@pytest.mark.slow
def test_bench_openvino_target(tmp_path):
    pytest.importorskip("openvino")
    model = family("vit")
    r = gb.bench(model, "tome", images(2), r=6, target="openvino", rounds=1, warmup=0, progress=False,
                 workdir=tmp_path)
    assert r.target == "openvino" and (tmp_path / "variant0" / "model.xml").is_file()
    assert (tmp_path / "baseline" / "model.xml").is_file() and 0.9 < r.fidelity["cosine"] < 1.0


def test_bench_refuses_bad_requests_before_work():
    model = family("vit")
    with pytest.raises(GraphPruneError, match="unknown recipe"):
        gb.sweep(model, [("tome", {"r": 2}), ("nosuch", {})], images(2))
    with pytest.raises(GraphPruneError, match="target"):
        gb.bench(model, "tome", images(2), target="tensorrt")
    with pytest.raises(GraphPruneError, match="nothing to benchmark"):
        gb.sweep(model, [], images(2))


def test_schedule_round_trip_and_optimize(tmp_path):
    model, x = family("vit"), images(2)
    s = Schedule("tome", {"r": [8, 4, 2, 0]}, {"model": "vit", "predicted_ms": 1.0})
    path = s.save(tmp_path / "s.json")
    loaded = load_schedule(path)
    assert loaded == s
    a = graphprune.optimize(model, schedule=path, example_inputs=x)
    b = graphprune.optimize(model, "tome", example_inputs=x, r=[8, 4, 2, 0])
    assert a.report.tokens_per_block == b.report.tokens_per_block == [65, 57, 53, 51]
    torch.testing.assert_close(a(x), b(x))
    c = graphprune.optimize(model, "tome", schedule=s, example_inputs=x, r=[0, 0, 0, 4])  # explicit options win
    assert c.report.tokens_per_block == [65, 65, 65, 65] and c.report.flop_ratio < 1.0


@pytest.mark.parametrize("content,message", [
    ("{not json", "not valid JSON"),
    ('{"recipe": "tome", "options": {}}', "not a graphprune schedule"),
    ('{"format": "graphprune-schedule", "version": 9, "recipe": "tome", "options": {}}', "version 9"),
    ('{"format": "graphprune-schedule", "version": 1, "recipe": "tome"}', "options"),
])
def test_bad_schedule_files(tmp_path, content, message):
    path = tmp_path / "s.json"
    path.write_text(content)
    with pytest.raises(ScheduleError, match=message):
        load_schedule(path)


def test_schedule_for_another_recipe_is_refused(tmp_path):
    path = Schedule("tome", {"r": 2}).save(tmp_path / "s.json")
    with pytest.raises(ScheduleError, match="for recipe 'tome', not 'evit'"):
        graphprune.optimize(family("vit"), "evit", schedule=path, example_inputs=images(2))
    with pytest.raises(ScheduleError, match="no such schedule"):
        graphprune.optimize(family("vit"), schedule=tmp_path / "missing.json", example_inputs=images(2))


def test_peak_memory_ignores_views_of_existing_storage():
    big = torch.zeros(10, 250_000)  # 10 MB; the input is a 1 MB view of it

    def f(t):
        same = t.to(torch.float32)  # no-op alias of the input
        return same * 2  # 1 MB

    assert 1_000_000 <= gb.peak_memory(f, (big[3],)) < 1_000_100


@pytest.mark.slow
def test_bench_compiles_both_sides(tmp_path):
    """compile=True: the unmodified model and the variant both run through torch.compile (in the warm-up), and the
    compiled variant's outputs keep their fidelity; only for the eager target."""
    model = family("vit")
    r = gb.bench(model, "tome", images(2), r=6, compile=True, rounds=1, warmup=0, progress=False, memory=False)
    assert r.compiled and r.latency_ms > 0 and 0.9 < r.fidelity["cosine"] < 1.0
    with pytest.raises(GraphPruneError, match="compile applies to target='eager'"):
        gb.bench(model, "tome", images(2), r=6, compile=True, target="onnx")
