"""graphprune.tune: latency tables, the search over them, and the tuned schedule end to end."""

import dataclasses

import pytest
import torch

import graphprune
from graphprune.errors import RecipeError, ScheduleError
from graphprune.schedule import tune as gt
from tests.conftest import family, images


def linear_table(depth=6, full=65, per_token=0.1, rest=2.0, overhead=0.0) -> gt.LatencyTable:
    """A synthetic table: each block costs per_token ms per token."""
    counts = [9, 17, 33, 49, 65][: 5] if full == 65 else gt.default_counts(full)
    blocks = [[per_token * c for c in counts] for _ in range(depth)]
    return gt.LatencyTable(counts=counts, blocks=blocks, rest_ms=rest, full_ms=rest + depth * per_token * full, batch=8,
                           target="eager", device="synthetic", model="synthetic", overhead_ms=overhead)


def test_table_interpolates_and_predicts():
    t = gt.LatencyTable(counts=[10, 20, 40], blocks=[[1.0, 2.0, 6.0], [2.0, 2.0, 2.0]], rest_ms=0.5, full_ms=8.5,
                        batch=1, target="eager", device="d", model="m", overhead_ms=0.25)
    assert t.block_ms(0, 30) == pytest.approx(4.0) and t.block_ms(0, 10) == 1.0 and t.block_ms(0, 5) == pytest.approx(0.5)
    assert t.predict([40, 40], [40, 40]) == pytest.approx(0.5 + 6.0 + 2.0)
    # block 0 reduces 40 → 20: attention at 40, MLP at 20 (mean), plus the reduction's overhead
    assert t.predict([40, 20], [20, 20]) == pytest.approx(0.5 + (6.0 + 2.0) / 2 + 0.25 + 2.0)


def test_tome_tokens_caps_r_like_the_recipe():
    tin, tout = gt.tome_tokens([10, 40, 40], tokens=65, protected=1)
    assert tin == [65, 55, 28] and tout == [55, 28, 15]  # (55 - 1) // 2 = 27, (28 - 1) // 2 = 13
    model = family("vit")
    fast = graphprune.optimize(model, "tome", example_inputs=images(2), r=[10, 40, 40, 40])
    assert fast.report.tokens_per_block == gt.tome_tokens([10, 40, 40, 40], 65, 1)[0]


def test_ramp_mean_slope_and_start():
    r = gt.ramp(10, 0.5, 5)
    assert r == [5, 8, 10, 12, 15] and sum(r) / 5 == 10
    assert gt.ramp(10, 0.0, 4, start=2) == [0, 0, 10, 10]
    assert gt.ramp(10, -1.0, 3) == [20, 10, 0]


def test_fit_to_budget_is_the_gentlest_schedule_that_meets_it():
    t = linear_table()
    budget = 0.7 * t.full_ms
    r = gt.fit_to_budget(t, lambda m: gt.ramp(m, 0.0, 6), budget, tokens=65, protected=1)
    assert t.predict(*gt.tome_tokens(r, 65, 1)) <= budget
    gentler = [v - 1 for v in r]
    assert t.predict(*gt.tome_tokens(gentler, 65, 1)) > budget
    assert gt.fit_to_budget(t, lambda m: gt.ramp(m, 0.0, 6), 0.1 * t.full_ms, 65, 1) is None  # below the rest: impossible


def test_search_finds_the_known_optimum():
    t = linear_table()
    budget = 0.6 * t.full_ms
    target = gt.fit_to_budget(t, lambda m: gt.ramp(m, 0.3, 6), budget, 65, 1)  # the best schedule: slope +0.3

    def score(r):
        return -sum((a - b) ** 2 for a, b in zip(r, target))

    best, scored = gt.search(t, budget, 65, 1, score, refine=3)
    assert best.r == target and best.slope == pytest.approx(0.3)
    assert all(c.predicted_ms <= budget + 1e-9 for c in scored)
    assert any(c.slope == 0.0 and c.start == 0 for c in scored)  # the constant schedule competes
    assert best.score == max(c.score for c in scored)


@pytest.mark.parametrize("gain,kept", [(0.01, "ramp"), (0.0005, "constant")])
def test_search_keeps_the_constant_schedule_when_the_gain_is_noise(gain, kept):
    """Per-sample scores: a ramp that beats the constant schedule by less than two standard errors
    of the paired difference is not taken; a clear gain is."""
    t = linear_table()
    budget = 0.6 * t.full_ms
    target = gt.fit_to_budget(t, lambda m: gt.ramp(m, 0.4, 6), budget, 65, 1)
    noise = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 0.01

    def score(r):  # 64 calibration samples: the target ramp gains `gain` on average, other ramps lose 0.01; ramps jitter by 0.01
        if len(set(r)) == 1:
            return 0.9 + noise
        jitter = torch.randn(64, generator=torch.Generator().manual_seed(sum(r))) * 0.01
        return 0.9 + noise + jitter - jitter.mean() + (gain if r == target else -0.01)

    best, scored = gt.search(t, budget, 65, 1, score, refine=0)
    top = max(scored, key=lambda c: c.score)
    assert top.r == target  # the ramp has the best mean either way
    assert (best.r == target) == (kept == "ramp")
    if kept == "constant":
        assert best.slope == 0.0 and best.start == 0
        g, se = gt.paired_gain(top.samples, best.samples)
        assert g > 0 and g <= 2 * se


def test_search_refuses_an_unreachable_budget():
    t = linear_table()
    with pytest.raises(ScheduleError, match="no schedule reaches"):
        gt.search(t, 0.2 * t.full_ms, 65, 1, lambda r: 0.0)


def test_table_save_load_and_corrupt_file(tmp_path):
    t = linear_table()
    assert gt.LatencyTable.load(t.save(tmp_path / "t.json")) == t
    (tmp_path / "bad.json").write_text("[1, 2")
    with pytest.raises(ScheduleError, match="not a graphprune latency table"):
        gt.LatencyTable.load(tmp_path / "bad.json")


def test_latency_table_profiles_every_block_and_is_cached(tmp_path, monkeypatch):
    model, x = family("vit"), images(4)
    table = gt.latency_table(model, (x,), counts=[17, 33, 65], rounds=1, cache_dir=tmp_path)
    assert table.counts == [17, 33, 65] and len(table.blocks) == 4 and table.batch == 4
    assert all(v > 0 for b in table.blocks for v in b) and table.full_ms > 0
    assert len(list(tmp_path.glob("*.json"))) == 1

    def no_profiling(*a, **k):
        raise AssertionError("profiled again instead of reading the cache")

    monkeypatch.setattr(gt, "_min_times", no_profiling)
    now = {"ms": table.full_ms * 1.2}  # the unmodified model, measured when the cached table is about to be reused
    monkeypatch.setattr(gt, "unmodified_ms", lambda *a, **k: now["ms"])
    chosen = gt.choose_table(model, (x,), counts=[17, 33, 65], cache_dir=tmp_path)
    assert chosen.table == table and chosen.reused and "cached" in chosen.describe()
    with pytest.raises(AssertionError, match="profiled again"):
        gt.latency_table(model, (images(2),), cache_dir=tmp_path)  # another batch: another table
    now["ms"] = table.full_ms / 3  # profiled on a busy machine: stale, profiled again
    with pytest.raises(AssertionError, match="profiled again"):
        gt.latency_table(model, (x,), counts=[17, 33, 65], cache_dir=tmp_path)
    monkeypatch.undo()
    stale = gt.LatencyTable(**{**table.__dict__, "full_ms": table.full_ms * 10})
    stale.save(next(tmp_path.glob("*.json")))
    chosen = gt.choose_table(model, (x,), counts=[17, 33, 65], rounds=1, cache_dir=tmp_path)
    assert not chosen.reused and chosen.stale_ms == stale.full_ms and "stale" in chosen.describe()
    assert gt.LatencyTable.load(chosen.path) == chosen.table != stale  # the fresh table replaced it


def test_block_inputs_follow_the_token_count():
    mask = torch.ones(2, 1, 1, 65)
    cut = gt._at_tokens({"attention_mask": mask, "scale": torch.ones(2, 3)}, 65, 17)
    assert cut["attention_mask"].shape == (2, 1, 1, 17) and cut["scale"].shape == (2, 3)
    assert gt._at_tokens(torch.ones(2, 65, 65), 65, 9, hidden=True).shape == (2, 9, 65)  # hidden: the token axis only


def test_tune_end_to_end(tmp_path, monkeypatch):
    model, x = family("vit", depth=6), images(8)
    chosen = gt.choose_table(model, (x,), rounds=1, cache_dir=tmp_path)
    # sub-ms blocks time too noisily on a busy machine to aim a budget at: the profiled table is replaced by one whose
    # blocks cost in proportion to their tokens, and reused as it is (a stale table is tested above)
    full = chosen.table.counts[-1]
    table = dataclasses.replace(chosen.table, blocks=[[b[-1] * n / full for n in chosen.table.counts] for b in chosen.table.blocks])
    table.save(chosen.path)
    monkeypatch.setattr(gt, "unmodified_ms", lambda *a, **k: table.full_ms)
    budget = table.rest_ms + 0.75 * sum(b[-1] for b in table.blocks)  # blocks 25 % faster than unreduced
    schedule = graphprune.tune(model, "tome", latency_ms=budget, example_inputs=(x,), calibration=[images(4, seed=5)],
                               rounds=2, cache_dir=tmp_path, progress=False, measure=False)
    r = schedule.options["r"]
    assert schedule.recipe == "tome" and len(r) == 6 and sum(r) > 0
    info = schedule.info
    assert {"predicted_ms", "fidelity", "candidates"} <= set(info) and info["predicted_ms"] <= budget
    assert 0.9 < info["fidelity"]["cosine"] < 1.0
    top = max(c["cosine"] for c in info["candidates"])
    # the best-scoring schedule, or the constant one when the best beat it only within calibration noise
    assert info["fidelity"]["cosine"] == top or (
        info["family"] == "ramp of slope +0.00 from block 0" and info["within_noise"]["gain"] <= 2 * info["within_noise"]["stderr"])
    path = schedule.save(tmp_path / "s.json")
    fast = graphprune.optimize(model, schedule=path, example_inputs=x[:2])
    assert fast.report.options["r"] == r
    # measured: the chosen schedule is timed against the unmodified model (tiny models barely speed up)
    measured = graphprune.tune(model, "tome", latency_ms=10 * table.full_ms, example_inputs=(x,), rounds=2, cache_dir=tmp_path,
                               progress=False)
    assert measured.info["measured_speedup"] > 0 and measured.info["measured_baseline_ms"] > 0


def test_tune_refuses_bad_requests():
    model = family("vit")
    with pytest.raises(RecipeError, match="unknown recipe"):
        graphprune.tune(model, "tomee", speedup=1.5)
    with pytest.raises(RecipeError, match="no per-block count"):
        graphprune.tune(model, "evit", speedup=1.5)
    with pytest.raises(ScheduleError, match="exactly one goal"):
        graphprune.tune(model, "tome")
    with pytest.raises(ScheduleError, match="above 1.0"):
        graphprune.tune(model, "tome", speedup=0.5)
    with pytest.raises(ScheduleError, match="'r' is what tune chooses"):
        graphprune.tune(model, "tome", speedup=1.5, options={"r": 4})
    with pytest.raises(ScheduleError, match="metric must be one of"):
        graphprune.tune(model, "tome", speedup=1.5, options={"metric": "queries"})
    with pytest.raises(ScheduleError, match="scores schedules by cosine or top1_agreement"):
        graphprune.tune(model, "tome", speedup=1.5, metric="kl")


def test_latency_table_on_onnx_runtime(tmp_path):
    model, x = family("vit"), images(4)
    table = gt.latency_table(model, (x,), target="onnx", counts=[33, 65], rounds=1, cache_dir=tmp_path)
    assert table.target == "onnx" and table.counts == [33, 65] and len(table.blocks) == 4
    assert all(v > 0 for b in table.blocks for v in b) and table.full_ms > 0
    eager = gt.latency_table(model, (x,), counts=[33, 65], rounds=1, cache_dir=tmp_path)
    assert eager.target == "eager" and eager.model != table.model  # one cached table per runtime
    assert len(list(tmp_path.glob("*.json"))) == 2
