"""--mode=latency: parts and keys, the fitted predictor, validation figures, the latency search objective
and export by latency budget (a fake timer: no timing values asserted, except that real ones are finite)."""

import json
import math
import os
import random
import re
import sys

import numpy as np
import pytest

from alphanet_jax import errors, latency, latency_fit as lf, latency_measure as lm, sampling, search as S
from alphanet_jax import evolution, pareto, search_results
from alphanet_jax import search_space as ss
from alphanet_jax.flops import count_flops
from alphanet_jax.search_config import SearchConfig

TINY = ss.get_space("tiny")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _part_ms(key: str) -> float:
    """A deterministic fake part time that grows with the part's numbers (input size, channels)."""
    nums = [int(n) for n in re.findall(r"\d+", key)]
    return 0.001 * (nums[0] ** 2) * (1 + sum(nums[1:4])) / 50


class FakeTimer:
    """Parts take `_part_ms`; a whole subnet takes 1.5 x their sum + 0.2 ms (a dispatch-like overhead)."""

    runtime, batch, warmup, repeats, rounds, statistic, dispatch_ms = "xla", 4, 0, 1, 1, "median", 0.01

    def __init__(self, space=TINY):
        self.space, self.parts_timed = space, []

    def parts_ms(self, parts, log=None):
        self.parts_timed += [p.key for p in parts]
        return [_part_ms(p.key) for p in parts]

    def subnets_ms(self, subnets):
        return [1.5 * sum(_part_ms(p.key) for p in lm.subnet_parts(s, self.space)) + 0.2 for s in subnets]

    def subnet_ms(self, subnet):
        return self.subnets_ms([subnet])[0]

    def describe(self):
        return {"backend": "cpu", "device_kind": "fake", "runtime": "xla"}


@pytest.mark.parametrize("name", ["tiny", "alphanet", "tiny_slimmable"])
def test_every_part_of_a_subnet_is_in_the_space_enumeration(name):
    space = ss.get_space(name)
    parts = lm.space_parts(space)
    rng = random.Random(0)
    for s in [space.min_subnet(), space.max_subnet()] + [sampling.sample_subnet(space, rng) for _ in range(100)]:
        ps = lm.subnet_parts(s, space)
        assert [p.kind for p in ps] == ["stem"] + ["block"] * sum(s.depth) + ["head"]
        assert all(p.key in parts for p in ps)


def test_keys_name_the_shape():
    s = TINY.max_subnet()
    k5 = lm.subnet_parts(s, TINY)
    k3 = lm.subnet_parts(s.replace(kernel_size=(3,) * len(s.kernel_size)), TINY)
    small = lm.subnet_parts(s.replace(resolution=min(TINY.resolutions)), TINY)
    assert k5[1].key != k3[1].key and "k5" in k5[1].key and "k3" in k3[1].key
    assert k5[0].key != small[0].key and k5[-1].key.startswith("head")
    assert lm.space_id(TINY).startswith("tiny-") and lm.space_id(TINY) != lm.space_id(ss.get_space("alphanet"))


def test_predictor_fit_and_validation_with_a_fake_timer():
    timer = FakeTimer()
    table = lm.build_table(timer, TINY, log=lambda m: None)
    assert set(table["entries"]) == set(lm.space_parts(TINY)) and table["space_id"] == lm.space_id(TINY)
    fitted, rows, report = lf.measure_and_validate(timer, TINY, table, fit_subnets=6, validate_subnets=8, seed=0,
                                                   log=lambda m: None)
    assert fitted["fit"]["model"] in ("scale * sum + overhead", "scale * sum + per-part + overhead")
    assert fitted["scale"] == pytest.approx(1.5) and fitted["overhead_ms"] == pytest.approx(0.2, abs=1e-6)
    assert fitted["per_part_ms"] == pytest.approx(0.0, abs=1e-6)
    s = TINY.max_subnet()
    assert lf.make_predictor(fitted, TINY)(s) == pytest.approx(timer.subnet_ms(s), rel=1e-6)
    assert len(rows) == 8 and report["latency_table"]["spearman"] == pytest.approx(1.0)
    assert report["latency_table"]["within_10pct"] == 1.0 and not lf.shortfall(report)
    flops = sorted(count_flops(ss.SubnetConfig.from_dict(r["subnet"], TINY), TINY) for r in rows)
    assert flops[0] < flops[-1]  # spread over the FLOPs range
    # a plain offset model wins when the parts add up exactly; a per-part term when there is one
    sums, counts = [1.0, 2.0, 4.0, 3.0, 5.0, 2.5, 6.0], [3, 5, 4, 6, 5, 3, 7]
    fit = lf.fit_predictor(table, sums, counts, [x + 0.3 for x in sums])
    assert fit["fit"]["model"] == "sum + overhead" and fit["overhead_ms"] == pytest.approx(0.3)
    fit = lf.fit_predictor(table, sums, counts, [0.9 * x - 0.05 * n + 0.5 for x, n in zip(sums, counts)])
    assert fit["fit"]["model"] == "scale * sum + per-part + overhead"
    assert (fit["scale"], fit["per_part_ms"], fit["overhead_ms"]) == pytest.approx((0.9, -0.05, 0.5))
    keys = list(table["entries"])[:2]
    assert latency.predict_from_keys(fit, keys) == pytest.approx(
        0.9 * sum(table["entries"][k] for k in keys) - 0.05 * 2 + 0.5)
    # an existing table's entries are kept, only missing parts are timed
    timer2 = FakeTimer()
    old = dict(table, entries={k: v for i, (k, v) in enumerate(table["entries"].items()) if i % 2})
    lm.build_table(timer2, TINY, old=old, log=lambda m: None)
    assert len(timer2.parts_timed) == len(table["entries"]) - len(old["entries"])


def test_spearman_and_report():
    assert lf.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert lf.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert lf.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(np.corrcoef([0.5, 0.5, 2], [0, 1, 2])[0, 1])
    assert math.isnan(lf.spearman([1, 1], [1, 2]))
    rows = [dict(measured_ms=m, predicted_ms=p, mflops=f, mflops_predicted_ms=q)
            for m, p, f, q in [(1.0, 1.05, 1, 2.0), (2.0, 2.5, 2, 2.0), (3.0, 2.95, 3, 3.0)]]
    r = lf.validation_report(rows)
    assert r["latency_table"]["within_10pct"] == pytest.approx(2 / 3) and r["mflops"]["spearman"] == 1.0
    assert "within +-10 %" in lf.shortfall(r) and "Spearman" not in lf.shortfall(r)


@pytest.mark.slow
def test_xla_timer_gives_finite_times():
    timer = lm.make_timer("xla", TINY, 2, warmup=1, repeats=2, rounds=2)
    parts = lm.subnet_parts(TINY.min_subnet(), TINY)
    assert all(math.isfinite(ms) and ms >= 0 for ms in timer.parts_ms([parts[0], parts[1], parts[-1]]))
    assert 0 < timer.subnet_ms(TINY.min_subnet()) < 10_000
    with pytest.raises(errors.UserError, match="latency.runtime = 'tflite'"):
        lm.make_timer("tflite", TINY, 2)


# ----------------------------------------------------------------------------
# The tasks: --mode=latency, the search objective, export by latency budget
# ----------------------------------------------------------------------------


@pytest.fixture()
def quick(tmp_path, monkeypatch):
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from alphanet_jax import tasks
    from configs import quickstart

    config = quickstart.get_config()
    config.latency.update(dict(fit_subnets=4, validate_subnets=5, batch_size=4))
    monkeypatch.setattr(lm, "make_timer", lambda runtime, space, batch, **kw: FakeTimer(space))
    return tasks, config, str(tmp_path)


def test_latency_task_writes_table_and_validation(quick, monkeypatch):
    tasks, config, wd = quick
    report = tasks.latency_task(config, wd)
    d = os.path.join(wd, "latency")
    assert {"table.json", "validation.json", "validation.png"} <= set(os.listdir(d))
    doc = json.load(open(os.path.join(d, "validation.json")))
    assert doc["report"]["latency_table"]["spearman"] == report["latency_table"]["spearman"] == pytest.approx(1.0)
    assert len(doc["rows"]) == 5 and {"predicted_ms", "measured_ms", "mflops_predicted_ms"} <= set(doc["rows"][0])
    table, path = tasks.load_latency_table(config, wd)
    assert table["batch_size"] == 4 and table["fit"]["subnets"] == 4
    timed = []
    monkeypatch.setattr(lm, "make_timer", lambda runtime, space, batch, **kw: _Recording(space, timed))
    tasks.latency_task(config, wd)  # the same device and settings: the table's parts are reused
    assert timed == []
    monkeypatch.setattr(FakeTimer, "repeats", 3)  # other timing settings: every part is timed again
    tasks.latency_task(config, wd)
    assert len(timed) == len(table["entries"])


class _Recording(FakeTimer):
    def __init__(self, space, timed):
        super().__init__(space)
        self.parts_timed = timed


def test_latency_table_bad_inputs_name_the_problem(quick, tmp_path):
    tasks, config, wd = quick
    with pytest.raises(errors.PathNotFoundError, match="--mode=latency"):
        tasks.load_latency_table(config, wd)
    tasks.latency_task(config, wd)
    config.latency.batch_size = 8  # a table of another batch size
    with pytest.raises(errors.UserError, match="batch_size=4.*batch_size=8"):
        tasks.load_latency_table(config, wd)
    config.latency.batch_size = 4
    other = tmp_path / "other.json"  # a table of another space
    t = json.load(open(os.path.join(wd, "latency", "table.json")))
    other.write_text(json.dumps(dict(t, space_id=lm.space_id(ss.get_space("alphanet")))))
    config.latency.table = str(other)
    with pytest.raises(errors.UserError, match=r"space_id='alphanet-.*space_id='tiny-"):
        tasks.load_latency_table(config, wd)
    other.write_text("{unreadable")
    with pytest.raises(errors.UserError, match="cannot be read"):
        tasks.load_latency_table(config, wd)
    config.latency.table = ""
    with pytest.raises(errors.UserError, match="scale must be"):
        latency.save_table(str(other), dict(t, scale=-1.0))


def _fake_eval(s):
    return {"top1": 50 + count_flops(s, TINY) + 0.01 * (hash(search_results.canonical_key(s)) % 7), "top5": 90.0,
            "loss": 1.0, "count": 10}


def test_search_objective_latency_buckets_and_budget(tmp_path):
    table = lm.build_table(FakeTimer(), TINY, log=lambda m: None)
    predict = lf.make_predictor(dict(table, scale=1.5, overhead_ms=0.2), TINY)
    lo, hi = predict(TINY.min_subnet()), predict(TINY.max_subnet())
    budget = lo + 0.4 * (hi - lo)
    cfg = dict(parent_popu_size=6, mutate_size=4, crossover_size=4, evo_iter=2, flops_min=0.0, flops_max=100.0,
               flops_step=0.1, objective="latency", max_latency_ms=budget, latency_step=(hi - lo) / 20)
    front = S.run_search(_fake_eval, TINY, cfg, str(tmp_path / "s"), log=lambda m: None, latency_fn=predict)
    assert front and all(r["latency_ms"] <= budget for r in front)
    assert all(r["latency_ms"] == pytest.approx(predict(ss.SubnetConfig.from_dict(r["subnet"], TINY)))
               for r in front)
    step = cfg["latency_step"]
    assert [r["bucket"] for r in front] == sorted({pareto.bucket_of(r["latency_ms"], step) for r in front})
    assert os.path.exists(tmp_path / "s" / "pareto.png")
    with pytest.raises(ValueError, match="needs latency_fn"):
        S.run_search(_fake_eval, TINY, cfg, str(tmp_path / "t"), log=lambda m: None)
    with pytest.raises(errors.ConfigError, match=r"search.max_latency_ms = 0.001 ms: no subnet meets it.*min"):
        S.run_search(_fake_eval, TINY, dict(cfg, max_latency_ms=0.001), str(tmp_path / "u"), log=lambda m: None,
                     latency_fn=predict)
    with pytest.raises(ValueError, match="objective must be one of"):
        SearchConfig.from_any(dict(objective="speed"))
    flops_front = S.run_search(_fake_eval, TINY, dict(cfg, objective="flops"), str(tmp_path / "f"),
                               log=lambda m: None)
    assert "latency_ms" not in flops_front[0]  # the default objective is unchanged


def test_export_picks_by_predicted_latency(quick):
    tasks, config, wd = quick
    row = lambda ms, top1: {"subnet": TINY.min_subnet().to_dict(), "mflops": 1.0, "top1": top1, "latency_ms": ms}
    front = [row(1.0, 60.0), row(2.0, 70.0), row(3.0, 80.0)]
    assert tasks.best_subnet_under_latency(front, 2.5, "p")["top1"] == 70.0
    with pytest.raises(errors.ConfigError, match="fastest: 1.000 ms"):
        tasks.best_subnet_under_latency(front, 0.5, "p")
    with pytest.raises(errors.ConfigError, match="searched without a latency table"):
        tasks.best_subnet_under_latency([{k: v for k, v in front[0].items() if k != "latency_ms"}], 2.0, "p")


BAD_LATENCY_CONFIGS = [
    ({"latency.repeats": 0}, r"latency.repeats = 0 is not allowed: it must be an integer >= 1"),
    ({"latency.rounds": 0}, r"latency.rounds = 0 is not allowed"),
    ({"latency.statistic": "mean"}, r"latency.statistic = 'mean' is not allowed"),
    ({"latency.runtime": "tflite"}, r"latency.runtime = 'tflite' is not allowed"),
    ({"latency.validate_subnets": 1}, r"latency.validate_subnets = 1"),
    ({"export.max_latency_ms": -1.0}, r"export.max_latency_ms = -1.0"),
    ({"search.objective": "speed"}, r"search: objective must be one of \['flops', 'latency'\]"),
]


@pytest.mark.parametrize("overrides,pattern", BAD_LATENCY_CONFIGS, ids=[str(c[0]) for c in BAD_LATENCY_CONFIGS])
def test_bad_latency_config_refused_before_any_task(tmp_path, monkeypatch, overrides, pattern):
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from alphanet_jax import tasks
    from configs import quickstart

    def never(*a, **k):
        raise AssertionError("a task started before the bad input was refused")

    for name in tasks.TASKS:
        monkeypatch.setitem(tasks.TASKS, name, never)
    config = quickstart.get_config()
    config.update_from_flattened_dict(overrides)
    with pytest.raises(errors.ConfigError, match=pattern):
        tasks.run(config, str(tmp_path / "w"), mode="latency,search,export")


def test_onnxruntime_parts_compute_the_xla_parts_and_time_finite():
    """The part graphs timed in onnxruntime compute what the XLA part functions compute."""
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    from alphanet_jax import onnx_export

    parts = lm.subnet_parts(TINY.min_subnet(), TINY)  # identity and pool_conv shortcuts, SE
    assert {"identity", "pool_conv"} <= {p.block.shortcut for p in parts if p.block}
    for p in parts:
        v, c = lm.part_variables(p, TINY), lm._in_channels(p)
        x = np.random.default_rng(0).standard_normal((2, p.width, p.width, c)).astype(np.float32)
        ref = np.asarray(lm._part_apply(p, TINY, 1e-5)(v, x))
        model = onnx_export.part_to_onnx(p.kind, v, TINY, p.width, c, p.block)
        got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"x": x.transpose(0, 3, 1, 2)})[0]
        got = got.transpose(0, 2, 3, 1) if got.ndim == 4 else got
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(ref))), err_msg=p.key)
    # one thread: onnxruntime's pool of one thread per core waits for every thread on a busy machine
    timer = lm.make_timer("onnxruntime", TINY, 2, warmup=1, repeats=2, rounds=1, threads=1)
    assert timer.describe()["runtime"] == "onnxruntime" and math.isfinite(timer.part_ms(parts[1]))
    assert 0 < timer.subnet_ms(TINY.min_subnet()) < 10_000


def test_latency_search_refuses_a_missing_table_or_an_unmeetable_budget_before_loading(quick, monkeypatch):
    tasks, config, wd = quick

    def never(*a, **k):
        raise AssertionError("weights loaded before the latency table and budget were checked")

    monkeypatch.setattr(tasks, "load_weights", never)
    config.search.objective = "latency"
    with pytest.raises(errors.PathNotFoundError, match="latency table .* is missing.*--mode=latency"):
        tasks.search_task(config, wd)
    tasks.latency_task(config, wd)
    config.search.max_latency_ms = 1e-6
    with pytest.raises(errors.ConfigError, match="no subnet meets it"):
        tasks.search_task(config, wd)


def test_a_budget_only_the_min_subnet_meets_is_a_config_error():
    predict = lambda s: 1.0 if s == TINY.min_subnet() else 2.0  # noqa: E731
    cfg = SearchConfig.from_any(dict(parent_popu_size=3, flops_min=0.0, flops_max=100.0, objective="latency",
                                       max_latency_ms=1.5, max_resample=20))
    with pytest.raises(errors.ConfigError, match=r"search.max_latency_ms = 1.5 ms: no subnet drawn"):
        evolution.initial_population(TINY, cfg, predict)
