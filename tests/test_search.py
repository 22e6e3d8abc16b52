"""Evolutionary search (alphanet_jax.search, with its settings, populations, Pareto buckets and process
exchange: search_config, evolution, pareto, process_comm) with a fake evaluator on the tiny space."""

import csv
import hashlib
import json
import os
import re
import threading

import numpy as np
import pytest

from alphanet_jax import evolution as E
from alphanet_jax import pareto as P
from alphanet_jax import process_comm as C
from alphanet_jax import search as S
from alphanet_jax import search_results as R
from alphanet_jax.flops import count_flops, count_params
from alphanet_jax.search_config import SearchConfig, default_config
from alphanet_jax.search_space import SubnetConfig, get_space

SPACE = get_space("tiny")
LO = count_flops(SPACE.min_subnet(), SPACE)
HI = count_flops(SPACE.max_subnet(), SPACE)
CFG = dict(parent_popu_size=8, mutate_size=6, crossover_size=6, mutate_prob=0.3, evo_iter=4, flops_min=LO,
           flops_max=LO + 0.5 * (HI - LO), flops_step=0.1, seed=3)
# An evaluation context as tasks.search_context makes (abridged): the weights and the calibration.
CTX = {"weights": {"source": "/runs/a", "step": 40, "fingerprint": "a" * 64},
       "calibration": {"batches": 8, "batch_size": 64, "seed": 5}}


def score(s: SubnetConfig) -> float:
    """A deterministic accuracy: grows with FLOPs, plus a hash-based spread."""
    h = int(hashlib.sha256(R.canonical_key(s).encode()).hexdigest()[:8], 16) / 2 ** 32
    return round(50 + 20 * count_flops(s, SPACE) / HI + 8 * h, 6)


class Fake:
    def __init__(self, fail_after=None, shift=0.0):
        self.calls = []
        self.fail_after = fail_after
        self.shift = shift  # other weights: every top-1 lower by `shift`
        self.lock = threading.Lock()

    def __call__(self, s):
        with self.lock:
            if self.fail_after is not None and len(self.calls) >= self.fail_after:
                raise KeyboardInterrupt("simulated crash")
            self.calls.append(R.canonical_key(s))
        return {"top1": score(s) - self.shift, "top5": min(100.0, score(s) + 20), "loss": 1.0 / score(s), "count": 37}


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def run(tmp_path, name, fake=None, cfg=CFG, **kw):
    fake = fake or Fake()
    d = str(tmp_path / name)
    kw.setdefault("log", lambda m: None)
    front = S.run_search(fake, SPACE, cfg, d, **kw)
    return front, fake, d


def strip(front):
    return json.dumps(front, sort_keys=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted search (with the plot) that the other tests compare against."""
    tmp = tmp_path_factory.mktemp("ref")
    front, fake, d = run(tmp, "ref", preset_results={"a0": {"mflops": LO, "top1": 55.0},
                                                     "a1": {"mflops": HI / 3, "top1": 60.0}})
    return dict(front=front, fake=fake, dir=d, rows=read_jsonl(os.path.join(d, "evaluated.jsonl")))


def test_deterministic_from_seed(tmp_path, reference):
    front, fake, d = run(tmp_path, "again", plot=False)
    assert strip(front) == strip(reference["front"])
    assert fake.calls == reference["fake"].calls
    with open(os.path.join(d, "pareto.json")) as a, open(os.path.join(reference["dir"], "pareto.json")) as b:
        assert a.read() == b.read()
    other, fake2, _ = run(tmp_path, "seed4", cfg=dict(CFG, seed=4), plot=False)
    assert fake2.calls != fake.calls


def test_flops_window_and_population_sizes(reference):
    calls = reference["fake"].calls
    assert len(calls) == len(set(calls))  # never evaluated twice
    # Generation sizes: 8 initial, then 12 per generation; duplicates are looked up, not re-run.
    assert CFG["parent_popu_size"] <= len(calls) <= CFG["parent_popu_size"] + 3 * 12
    assert len(calls) > CFG["parent_popu_size"] + 12  # later generations did add new candidates
    for key in calls:
        f = count_flops(SubnetConfig.from_json(key, SPACE), SPACE)
        assert CFG["flops_min"] <= f <= CFG["flops_max"]
    assert calls[0] == R.canonical_key(SPACE.min_subnet())  # the population starts with the min subnet
    gens = [r["generation"] for r in reference["rows"]]
    assert gens == sorted(gens) and gens[0] == 0 and gens[-1] == CFG["evo_iter"] - 1


def test_population_generation_is_in_window_and_deterministic():
    cfg = SearchConfig.from_any(CFG)
    parents = [SPACE.min_subnet(), SubnetConfig.from_json(R.canonical_key(SPACE.min_subnet()))]
    pop = E.next_population(parents, SPACE, cfg, 5)
    assert len(pop) == cfg.mutate_size + cfg.crossover_size
    assert all(cfg.flops_min <= count_flops(s, SPACE) <= cfg.flops_max for s in pop)
    assert pop == E.next_population(parents, SPACE, cfg, 5)
    assert pop != E.next_population(parents, SPACE, cfg, 6)
    init = E.initial_population(SPACE, cfg)
    assert init[0] == SPACE.min_subnet() and len(init) == cfg.parent_popu_size
    with pytest.raises(RuntimeError, match="empty"):
        E.next_population([], SPACE, cfg, 1)


def test_pareto_buckets_rule():
    def row(f, a):
        return {"mflops": f, "top1": a}

    rows = [row(204.9, 70.0), row(195.1, 71.0), row(200.0, 71.0),  # one bucket (200); tie keeps the first
            row(205.0, 60.0),   # round(20.5) = 20 (Python rounds halves to even) -> bucket 200
            row(215.0, 61.0),   # round(21.5) = 22 -> bucket 220
            row(224.0, 60.0),   # bucket 220, worse
            row(230.0, float("nan"))]  # never wins
    b = P.pareto_buckets(rows, 10)
    assert sorted(b) == [200, 220]
    assert b[200] == row(195.1, 71.0) and b[220] == row(215.0, 61.0)
    assert P.bucket_of(205.0, 10) == 200 and P.bucket_of(215.0, 10) == 220 and P.bucket_of(214.9, 10) == 210
    assert P.non_dominated([row(1, 50), row(2, 49), row(3, 60), row(3, 59)]) == [True, False, True, False]


def test_front_equals_buckets_over_all_evaluated(reference):
    """Results are fixed per subnet, so the final buckets are the per-bucket best over the whole
    results file (in first-evaluation order)."""
    rows = reference["rows"]
    expect = P.pareto_buckets(rows, CFG["flops_step"])
    front = reference["front"]
    assert [r["bucket"] for r in front] == sorted(expect)
    for r in front:
        assert r["subnet"] == expect[r["bucket"]]["subnet"] and r["top1"] == expect[r["bucket"]]["top1"]
        assert r["top1"] == score(SubnetConfig.from_dict(r["subnet"]))
        assert r["mflops"] == count_flops(SubnetConfig.from_dict(r["subnet"]), SPACE)
    assert any(r["non_dominated"] for r in front)


@pytest.mark.parametrize("k", [5, 13])  # inside the initial population / inside generation 2
def test_resume_after_interruption(tmp_path, reference, k):
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "w", Fake(fail_after=k))
    assert len(read_jsonl(str(tmp_path / "w" / "evaluated.jsonl"))) == k
    front, fake, d = run(tmp_path, "w")
    rows = read_jsonl(os.path.join(d, "evaluated.jsonl"))
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys))  # no duplicates
    assert keys == reference["fake"].calls  # same candidates, same order
    assert len(fake.calls) == len(reference["fake"].calls) - k  # nothing re-evaluated
    assert strip(front) == strip(reference["front"])


def test_truncated_last_line_is_ignored(tmp_path, reference):
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "w", Fake(fail_after=10))
    path = str(tmp_path / "w" / "evaluated.jsonl")
    full = read_jsonl(path)
    with open(path, "a") as f:  # a crash in the middle of writing record 11
        f.write(json.dumps(full[-1])[:40])
    with pytest.warns(UserWarning, match="truncated last line"):
        front, fake, d = run(tmp_path, "w")
    assert strip(front) == strip(reference["front"])
    rows = read_jsonl(path)  # every line parses again
    assert [r["key"] for r in rows] == reference["fake"].calls
    assert len(fake.calls) == len(reference["fake"].calls) - 10


def test_corrupt_middle_line_is_an_error(tmp_path):
    d = tmp_path / "w"
    d.mkdir()
    (d / "evaluated.jsonl").write_text('{"key": "a", "top1": 1}\nnot json\n{"key": "b", "top1": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        R.ResultStore(str(d / "evaluated.jsonl"))


def test_outputs_written_and_consistent(reference):
    d, front = reference["dir"], reference["front"]
    for name in ("pareto.json", "pareto.csv", "pareto.png", "evaluated.jsonl", "search_config.json"):
        assert os.path.getsize(os.path.join(d, name)) > 0
    with open(os.path.join(d, "pareto.json")) as f:
        assert json.load(f) == {"context_id": None, "context": None, "front": json.loads(json.dumps(front))}
    with open(os.path.join(d, "pareto.csv")) as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["subnet", "mflops", "params", "top1", "top5"]
    assert len(table) == len(front)
    for t, r in zip(table, front):
        s = SubnetConfig.from_json(t["subnet"], SPACE)
        assert s.to_dict() == r["subnet"]
        assert float(t["mflops"]) == r["mflops"] == count_flops(s, SPACE)
        assert int(t["params"]) == r["params"] == count_params(s, SPACE)
        assert float(t["top1"]) == r["top1"] and float(t["top5"]) == r["top5"]
    assert [r["mflops"] for r in front] == sorted(r["mflops"] for r in front)
    with open(os.path.join(d, "pareto.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_config_validation():
    cfg = SearchConfig.from_any(default_config())
    assert cfg.parent_popu_size == 512 and cfg.flops_step == 10
    with pytest.raises(ValueError, match="unknown"):
        SearchConfig.from_any(dict(CFG, popu=3))
    with pytest.raises(ValueError, match="empty FLOPs window"):
        SearchConfig.from_any(dict(CFG, flops_min=2.0, flops_max=1.0))


# ---------------------------------------------------------------------------------------------
# Several processes, simulated with threads and an in-memory collective
# ---------------------------------------------------------------------------------------------


class ThreadComm:
    def __init__(self, shared, index, count):
        self.shared, self.process_index, self.process_count = shared, index, count

    def _exchange(self, x):
        sh = self.shared
        sh["slots"][self.process_index] = np.array(x, copy=True)
        sh["barrier"].wait()
        out = np.stack(sh["slots"])
        sh["barrier"].wait()
        return out

    def allgather(self, x):
        return self._exchange(x)

    def broadcast(self, x):
        return self._exchange(x)[0]


@pytest.mark.parametrize("nproc", [2, 3])
def test_candidates_spread_over_processes(tmp_path, reference, nproc):
    with pytest.raises(KeyboardInterrupt):  # a restart across processes too
        run(tmp_path, "p0", Fake(fail_after=9), context=CTX)
    shared = {"slots": [None] * nproc, "barrier": threading.Barrier(nproc, timeout=60)}
    fakes = [Fake() for _ in range(nproc)]
    fronts, errors = [None] * nproc, []

    def host(i):
        try:
            fronts[i] = S.run_search(fakes[i], SPACE, CFG, str(tmp_path / f"p{i}"), log=lambda m: None,
                                     comm=ThreadComm(shared, i, nproc), plot=False, context=CTX)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
            shared["barrier"].abort()

    threads = [threading.Thread(target=host, args=(i,)) for i in range(nproc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for f in fronts:
        assert strip(f) == strip(reference["front"])
    calls = [c for f in fakes for c in f.calls]
    assert len(calls) == len(set(calls)) == len(reference["fake"].calls) - 9
    assert all(f.calls for f in fakes)  # every process did some of the work
    rows = read_jsonl(str(tmp_path / "p0" / "evaluated.jsonl"))
    assert sorted(r["key"] for r in rows) == sorted(reference["fake"].calls)
    assert {r["context"] for r in rows} == {R.context_id(CTX)}
    assert not any(os.path.exists(tmp_path / f"p{i}" / "evaluated.jsonl") for i in range(1, nproc))


def test_float64_exchange_is_bit_exact():
    x = np.array([[76.12345678901234, np.nan, 1e-300], [0.1, -2.5, 3.0]])
    y = C._from_int32(C._as_int32(x), x.shape)
    assert y.tobytes() == x.tobytes()
    g = C._from_int32(np.stack([C._as_int32(x), C._as_int32(2 * x)]), x.shape, leading=2)
    assert g.shape == (2, 2, 3) and g[1].tobytes() == (2 * x).tobytes()


def test_jax_comm_single_process():
    comm = C.JaxComm()
    x = np.array([[76.12345678901234, np.nan], [0.1, 1e-300]])
    g = comm.allgather(x)
    assert g.shape == (1, 2, 2) and g[0].tobytes() == x.tobytes()
    assert comm.broadcast(x).tobytes() == x.tobytes()


# ---------------------------------------------------------------------------------------------
# The evaluation context: results made with other weights or settings are never reused
# ---------------------------------------------------------------------------------------------


def ctx(**changes):
    """CTX with dotted-key changes ('weights.step')."""
    c = json.loads(json.dumps(CTX))
    for key, value in changes.items():
        section, field = key.split(".")
        c[section][field] = value
    return c


def read_pareto(d):
    with open(os.path.join(d, "pareto.json")) as f:
        return json.load(f)


def test_other_weights_re_evaluate_every_candidate(tmp_path, reference):
    calls = reference["fake"].calls
    front_a, fake_a, d = run(tmp_path, "w", context=CTX, plot=False)
    assert fake_a.calls == calls and strip(front_a) == strip(reference["front"])
    # A less trained checkpoint elsewhere: other weights, lower accuracies.
    other = ctx(**{"weights.source": "/runs/b", "weights.step": 20, "weights.fingerprint": "b" * 64})
    logs = []
    front_b, fake_b, _ = run(tmp_path, "w", Fake(shift=20.0), context=other, plot=False, log=logs.append)
    assert fake_b.calls == calls  # every candidate evaluated again, none reused
    assert [r["top1"] for r in front_b] == [score(SubnetConfig.from_dict(r["subnet"])) - 20.0 for r in front_b]
    assert max(r["top1"] for r in front_b) == max(r["top1"] for r in front_a) - 20.0
    said = [m for m in logs if "not reused" in m]
    assert len(said) == 1, logs
    assert f"{len(calls)} stored results" in said[0]
    assert "weights.step 40 -> 20" in said[0] and "weights.fingerprint aaaaaaaaaaaa -> bbbbbbbbbbbb" in said[0]
    assert all(f"{len(calls)} known" not in m for m in logs if "generation 1/" in m)
    assert read_pareto(d) == {"context_id": R.context_id(other), "context": other,
                              "front": json.loads(json.dumps(front_b))}
    rows = read_jsonl(os.path.join(d, "evaluated.jsonl"))
    assert [r["context"] for r in rows] == [R.context_id(CTX)] * len(calls) + [R.context_id(other)] * len(calls)
    with open(os.path.join(d, "search_config.json")) as f:
        assert json.load(f)["contexts"] == {R.context_id(CTX): CTX, R.context_id(other): other}
    # Back to the first weights: their results are still there and valid.
    front_a2, fake_a2, _ = run(tmp_path, "w", context=CTX, plot=False)
    assert fake_a2.calls == [] and strip(front_a2) == strip(front_a)


@pytest.mark.parametrize("changes, why", [
    ({}, None),
    ({"weights.source": "/moved/a"}, None),  # the same weights (by content) elsewhere
    ({"calibration.batches": 4}, "calibration.batches 8 -> 4"),
    ({"calibration.seed": 6}, "calibration.seed 5 -> 6"),
])
def test_reuse_only_with_the_same_weights_and_settings(tmp_path, reference, changes, why):
    calls = reference["fake"].calls
    run(tmp_path, "w", context=CTX, plot=False)
    logs = []
    front, fake, _ = run(tmp_path, "w", Fake(shift=1.0), context=ctx(**changes), plot=False, log=logs.append)
    said = [m for m in logs if "not reused" in m]
    if why is None:
        assert fake.calls == [] and not said
        assert strip(front) == strip(reference["front"])
        assert all(" 0 evaluated" in m for m in logs if "generation" in m)
    else:
        assert fake.calls == calls
        assert len(said) == 1 and why in said[0] and "weights." not in said[0], said


def test_results_without_a_context_are_re_evaluated(tmp_path, reference):
    """evaluated.jsonl of an older version (no context in its rows): unknown weights, not reused."""
    calls = reference["fake"].calls
    run(tmp_path, "w", plot=False)
    logs = []
    front, fake, _ = run(tmp_path, "w", Fake(shift=1.0), context=CTX, plot=False, log=logs.append)
    assert fake.calls == calls
    said = [m for m in logs if "not reused" in m]
    assert len(said) == 1 and "older version" in said[0]


FRONT_ROW = {"subnet": SPACE.min_subnet().to_dict(), "mflops": LO, "params": count_params(SPACE.min_subnet(), SPACE),
             "top1": 50.0, "top5": 70.0}


@pytest.mark.parametrize("content, what", [
    (b"not json", "not a valid JSON file"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "not a valid JSON file"),
    (json.dumps({"rows": []}).encode(), "not a search front"),
    (json.dumps({"front": []}).encode(), "empty front"),
    (json.dumps({"front": [{"subnet": FRONT_ROW["subnet"], "mflops": LO}]}).encode(), r"row 0 lacks \['top1'\]"),
    (json.dumps([FRONT_ROW, {"mflops": LO, "top1": 1.0}]).encode(), r"row 1 lacks \['subnet'\]"),
    (json.dumps({"front": [dict(FRONT_ROW, top1="high")]}).encode(), "'top1' must be a number"),
    (json.dumps({"front": [dict(FRONT_ROW, subnet=dict(FRONT_ROW["subnet"], depth=[1]))]}).encode(),
     "row 0: subnet field 'depth'"),
])
def test_malformed_pareto_json_names_the_file(tmp_path, content, what):
    path = tmp_path / "pareto.json"
    path.write_bytes(content)
    with pytest.raises(R.SearchResultsError, match=f"{re.escape(str(path))}.*{what}"):
        R.read_front(str(path), SPACE)


def test_check_front_context():
    R.check_front_context("p.json", CTX, ctx(**{"weights.source": "/moved"}))  # same weights: accepted
    with pytest.raises(R.SearchResultsError, match=r"p\.json .*weights\.fingerprint aaaaaaaaaaaa -> bbbbbbbbbbbb.*"
                                                   r"rerun the search"):
        R.check_front_context("p.json", CTX, ctx(**{"weights.fingerprint": "b" * 64}))
    with pytest.raises(R.SearchResultsError, match=r"p\.json does not record .* older version"):
        R.check_front_context("p.json", None, CTX)


# ---------------------------------------------------------------------------------------------
# The export task picks from the front only for the weights it was searched with
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def export_setup(tmp_path, monkeypatch):
    """A workdir whose pareto.json was searched with weights A; `use(variables, step)` sets the weights
    the export task loads (no checkpoint, no compilation before the context check)."""
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    from alphanet_jax import tasks
    from configs import quickstart

    config = quickstart.get_config()
    config.export.max_mflops = HI
    loaded = {}
    monkeypatch.setattr(tasks.train_lib, "restore_variables", lambda config, source, mesh=None: loaded["weights"])

    class Calibrating(Exception):
        pass

    def past_the_check(*a, **k):
        raise Calibrating

    monkeypatch.setattr(tasks.train_lib, "make_model", past_the_check)  # the step after the check
    vars_a = {"params": {"w": np.arange(6, dtype=np.float32)}, "batch_stats": {"mean": np.zeros(2, np.float32)}}
    loaded["weights"] = (vars_a, 40)
    _, where = tasks.load_weights(config, str(tmp_path))
    (tmp_path / "search").mkdir()
    R.write_outputs(str(tmp_path / "search"), [FRONT_ROW], None, None, plot=False,
                    context=tasks.search_context(config, where, vars_a))

    def export(variables, step, **overrides):
        loaded["weights"] = (variables, step)
        for k, v in overrides.items():
            section, field = k.split(".")
            config[section][field] = v
        return tasks.export_task(config, str(tmp_path))

    return dict(export=export, vars_a=vars_a, Calibrating=Calibrating, path=str(tmp_path / "search" / "pareto.json"))


def test_export_refuses_a_front_from_other_weights(export_setup):
    x = export_setup
    with pytest.raises(x["Calibrating"]):  # the same weights: the pick goes on to calibration
        x["export"](x["vars_a"], 40)
    perturbed = {"params": {"w": x["vars_a"]["params"]["w"] + 1e-3}, "batch_stats": x["vars_a"]["batch_stats"]}
    with pytest.raises(R.SearchResultsError, match=f"{re.escape(x['path'])} was evaluated with other weights.*"
                                                   r"weights\.step 40 -> 20, weights\.fingerprint .*--mode=search"):
        x["export"](perturbed, 20)
    with pytest.raises(R.SearchResultsError, match=r"\(calibration\.batches 8 -> 2\); rerun"):
        x["export"](x["vars_a"], 40, **{"search.calib_batches": 2})


def test_export_names_a_malformed_pareto_json(export_setup):
    x = export_setup
    with open(x["path"], "w") as f:
        json.dump({"front": [{"subnet": FRONT_ROW["subnet"], "top1": 50.0}]}, f)
    with pytest.raises(R.SearchResultsError, match=f"{re.escape(x['path'])}: front row 0 lacks \\['mflops'\\]"):
        x["export"](x["vars_a"], 40)
