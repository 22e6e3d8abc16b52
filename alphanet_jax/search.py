"""Evolutionary search over subnets for the best accuracy per FLOPs bucket (spec §9).

Follows `AlphaNet:parallel_supernet_evo_search.py`:

* initial population: the min subnet, then `parent_popu_size - 1` uniform subnets
  with MFLOPs inside [flops_min, flops_max] (rejection sampling);
* every generation: evaluate the candidates (BN calibration + evaluation, done by
  the user's `evaluate_fn(subnet) -> dict with 'top1'`), then update the Pareto
  buckets: bucket = round(mflops / flops_step) * flops_step (Python round), each
  bucket keeps the candidate with the highest top-1 (a later one replaces it only
  when strictly better);
* the next population is `mutate_size` mutants (parent drawn uniformly from the
  bucket winners, `mutate(prob=mutate_prob)`, parent and mutation redrawn until the
  child's MFLOPs are in the window) followed by `crossover_size` children (two
  parents, `crossover`, redrawn until in the window).

Differences from the reference, all deliberate:

* Randomness comes only from `step_rng(seed, generation, STREAM)` (a fresh
  `random.Random` per generation), so every host computes the same candidates and a
  resumed search replays exactly the same stream.
* A subnet already evaluated (in this run or a previous one) is not evaluated again;
  its stored result is reused. The reference re-evaluates duplicates.
* The reference drops the last `len % world` candidates so that its all-gather has an
  equal count per rank; here nothing is dropped: the results travel as a fixed-size
  numeric array with NaN for the candidates a host did not evaluate.
* Parents are drawn from the bucket winners in bucket order (sorted by MFLOPs), not
  dict-insertion order.
* The final front is written to files (the reference only logs it).

Workdir files: `evaluated.jsonl` (one JSON line per evaluated subnet, flushed and
fsynced; read back on restart; a truncated last line from a crash is dropped with a
warning), `pareto.json`, `pareto.csv`, `pareto.png` and `search_config.json`.

Multi-host: every host runs `run_search` with the same arguments. Candidate i of a
generation is evaluated by the host with i % process_count == process_index; the
evaluator itself is data-parallel over that host's devices (use
`evaluate.local_mesh()` and unsharded iterators). Process 0 owns the files: it reads
`evaluated.jsonl` and broadcasts which candidates are already known, and it writes
all outputs.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import time
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from alphanet_jax.flops import count_flops, count_params
from alphanet_jax.search_space import (PRESET_TITLES, PRESETS, SearchSpace, SubnetConfig, crossover, get_space,
                                       mutate, sample_subnet_in_range, step_rng)

__all__ = ["SearchConfig", "run_search", "default_config", "canonical_key", "pareto_buckets", "bucket_of",
           "ResultStore", "write_outputs", "plot_pareto", "non_dominated", "JaxComm", "STREAM"]

STREAM = 9  # step_rng stream of the evolutionary search (distinct from training's sampler)
RESULTS_FILE = "evaluated.jsonl"
NUMERIC_FIELDS = ("top1", "top5", "loss", "count", "seconds")
_CONFIG_KEYS = ("parent_popu_size", "mutate_size", "crossover_size", "mutate_prob", "evo_iter", "flops_min",
                "flops_max", "flops_step", "seed")


# ----------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """The evo-search settings. Defaults: `AlphaNet:configs/parallel_supernet_evo_search.yml`'s
    realistic sizes (its comments: 512 / 128 / 128), window [200, 1200], step 10."""

    parent_popu_size: int = 512
    mutate_size: int = 128
    crossover_size: int = 128
    mutate_prob: float = 0.2
    evo_iter: int = 20
    flops_min: float = 200.0
    flops_max: float = 1200.0
    flops_step: float = 10.0
    seed: int = 0
    max_resample: int = 100_000  # tries per child before giving up (the reference loops forever)

    @classmethod
    def from_any(cls, cfg: Any) -> "SearchConfig":
        if isinstance(cfg, SearchConfig):
            return cfg
        if hasattr(cfg, "to_dict"):
            cfg = cfg.to_dict()
        cfg = dict(cfg or {})
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - allowed)
        if unknown:
            raise ValueError(f"unknown search config keys {unknown}; allowed: {sorted(allowed)}")
        out = cls(**cfg)
        out.check()
        return out

    def check(self) -> None:
        for k in ("parent_popu_size", "evo_iter"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"search config {k} must be >= 1, got {getattr(self, k)}")
        for k in ("mutate_size", "crossover_size"):
            if int(getattr(self, k)) < 0:
                raise ValueError(f"search config {k} must be >= 0, got {getattr(self, k)}")
        if self.evo_iter > 1 and self.mutate_size + self.crossover_size < 1:
            raise ValueError("mutate_size + crossover_size must be >= 1 when evo_iter > 1")
        if not 0.0 <= self.mutate_prob <= 1.0:
            raise ValueError(f"mutate_prob must be in [0, 1], got {self.mutate_prob}")
        if self.flops_min > self.flops_max:
            raise ValueError(f"empty FLOPs window: flops_min {self.flops_min} > flops_max {self.flops_max}")
        if not self.flops_step > 0:
            raise ValueError(f"flops_step must be > 0, got {self.flops_step}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_config():
    """An ml_collections ConfigDict with the defaults of `SearchConfig`."""
    import ml_collections

    return ml_collections.ConfigDict(SearchConfig().to_dict())


# ----------------------------------------------------------------------------
# Pure helpers
# ----------------------------------------------------------------------------


def canonical_key(subnet: SubnetConfig) -> str:
    """The subnet's canonical JSON (sorted keys, compact): the results-file key."""
    return json.dumps(subnet.to_dict(), sort_keys=True, separators=(",", ":"))


def bucket_of(mflops: float, step: float) -> float:
    """round(mflops / step) * step, with Python's round (halves to even), as the reference."""
    return round(mflops / step) * step


def pareto_buckets(rows: Iterable[Mapping[str, Any]], step: float,
                   buckets: dict[float, dict] | None = None) -> dict[float, dict]:
    """Updates {bucket: row} with `rows` in order: a row replaces its bucket's winner only if its
    top-1 is strictly higher (rows with NaN top-1 never win)."""
    buckets = {} if buckets is None else buckets
    for row in rows:
        top1 = row["top1"]
        if top1 is None or (isinstance(top1, float) and math.isnan(top1)):
            continue
        b = bucket_of(row["mflops"], step)
        if b not in buckets or top1 > buckets[b]["top1"]:
            buckets[b] = dict(row)
    return buckets


def non_dominated(rows: Sequence[Mapping[str, Any]]) -> list[bool]:
    """For each row: no other row has <= MFLOPs and > top-1, or < MFLOPs and >= top-1."""
    out = []
    for r in rows:
        dom = any((o["mflops"] <= r["mflops"] and o["top1"] > r["top1"])
                  or (o["mflops"] < r["mflops"] and o["top1"] >= r["top1"]) for o in rows)
        out.append(not dom)
    return out


def _in_window(subnet: SubnetConfig, space: SearchSpace, cfg: SearchConfig) -> bool:
    return cfg.flops_min <= count_flops(subnet, space) <= cfg.flops_max


def initial_population(space: SearchSpace, cfg: SearchConfig) -> list[SubnetConfig]:
    """The min subnet, then parent_popu_size - 1 uniform subnets in the FLOPs window."""
    rng = step_rng(cfg.seed, 0, STREAM)
    pop = [space.min_subnet()]
    for _ in range(cfg.parent_popu_size - 1):
        pop.append(sample_subnet_in_range(space, rng, cfg.flops_min, cfg.flops_max, max_tries=cfg.max_resample))
    return pop


def next_population(parents: Sequence[SubnetConfig], space: SearchSpace, cfg: SearchConfig,
                    generation: int) -> list[SubnetConfig]:
    """mutate_size mutants then crossover_size children of `parents` (the sorted bucket winners),
    each redrawn (parents included) until its MFLOPs are in the window."""
    if not parents:
        raise RuntimeError("the Pareto buckets are empty: no candidate was evaluated with a finite top-1")
    rng = step_rng(cfg.seed, generation, STREAM)
    out: list[SubnetConfig] = []

    def draw(make: Callable[[], SubnetConfig], what: str) -> SubnetConfig:
        for _ in range(cfg.max_resample):
            child = make()
            if _in_window(child, space, cfg):
                return child
        raise RuntimeError(f"no {what} with MFLOPs in [{cfg.flops_min}, {cfg.flops_max}] after "
                           f"{cfg.max_resample} draws (generation {generation})")

    for _ in range(cfg.mutate_size):
        out.append(draw(lambda: mutate(rng.choice(parents), space, rng, cfg.mutate_prob), "mutant"))
    for _ in range(cfg.crossover_size):
        out.append(draw(lambda: crossover(rng.choice(parents), rng.choice(parents), rng), "crossover child"))
    return out


# ----------------------------------------------------------------------------
# The results file
# ----------------------------------------------------------------------------


class ResultStore:
    """`evaluated.jsonl`: one JSON object per evaluated subnet, keyed by `canonical_key`."""

    def __init__(self, path: str, writable: bool = True, read: bool = True):
        self.path = path
        self.writable = writable
        self.rows: dict[str, dict] = {}
        if read:
            self._load()

    def _load(self) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path, "rb") as f:
            data = f.read()
        lines = data.split(b"\n")
        offset = 0
        good_end = 0
        for i, raw in enumerate(lines):
            is_last = i == len(lines) - 1 or (i == len(lines) - 2 and lines[-1] == b"")
            start = offset
            offset += len(raw) + 1
            if not raw.strip():
                if i < len(lines) - 1:
                    good_end = offset
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
                key = row["key"]
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
                if is_last:
                    warnings.warn(f"{self.path}: ignoring a truncated last line ({len(raw)} bytes, {e}); "
                                  f"it was being written when the previous run stopped")
                    good_end = start
                    break
                raise ValueError(f"{self.path}: line {i + 1} is not a valid result record ({e}); "
                                 f"the file is corrupt") from None
            self.rows.setdefault(key, row)
            good_end = min(offset, len(data))
        if self.writable and good_end != len(data):
            # Cut the broken tail, and end the file with a newline before appending to it.
            with open(self.path, "r+b") as f:
                f.truncate(good_end)
                if good_end and data[good_end - 1:good_end] != b"\n":
                    f.seek(good_end)
                    f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())
        elif self.writable and data and not data.endswith(b"\n"):
            with open(self.path, "ab") as f:
                f.write(b"\n")

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def get(self, key: str) -> dict | None:
        return self.rows.get(key)

    def add(self, row: dict) -> None:
        key = row["key"]
        if key in self.rows:
            return
        self.rows[key] = row
        if not self.writable:
            return
        line = json.dumps(row, sort_keys=True) + "\n"
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


# ----------------------------------------------------------------------------
# Multi-host exchange
# ----------------------------------------------------------------------------


class JaxComm:
    """Process collectives over `jax.experimental.multihost_utils`."""

    def __init__(self):
        import jax

        self.process_index = jax.process_index()
        self.process_count = jax.process_count()

    def allgather(self, x: np.ndarray) -> np.ndarray:
        """[P, *x.shape]: every process's float64 x, bit for bit."""
        from jax.experimental import multihost_utils

        out = np.asarray(multihost_utils.process_allgather(_as_int32(x), tiled=False))
        return _from_int32(out, x.shape, leading=out.shape[0])

    def broadcast(self, x: np.ndarray) -> np.ndarray:
        """Process 0's float64 x on every process, bit for bit."""
        from jax.experimental import multihost_utils

        out = np.asarray(multihost_utils.broadcast_one_to_all(_as_int32(x), is_source=self.process_index == 0))
        return _from_int32(out, x.shape)


def _as_int32(x: np.ndarray) -> np.ndarray:
    # jax (without x64) would round float64 to float32; exchanging the raw bits as int32 keeps every
    # process's numbers identical, which keeps their searches in lockstep.
    return np.ascontiguousarray(x, np.float64).reshape(-1).view(np.int32)


def _from_int32(y: np.ndarray, shape: tuple, leading: int | None = None) -> np.ndarray:
    y = np.ascontiguousarray(y, np.int32)
    if leading is None:
        return y.reshape(-1).view(np.float64).reshape(shape)
    return y.reshape(leading, -1).view(np.float64).reshape((leading, *shape))


class _SingleComm:
    process_index = 0
    process_count = 1

    def allgather(self, x):
        return x[None]

    def broadcast(self, x):
        return x


# ----------------------------------------------------------------------------
# The search
# ----------------------------------------------------------------------------


def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _row(subnet: SubnetConfig, space: SearchSpace, values: Sequence[float], generation: int) -> dict:
    # Missing numbers become null (strict JSON); top1 is always finite.
    vals = {f: (None if math.isnan(float(v)) else float(v)) for f, v in zip(NUMERIC_FIELDS, values)}
    if vals["count"] is not None:
        vals["count"] = int(vals["count"])
    return {"key": canonical_key(subnet), "subnet": subnet.to_dict(), "resolution": subnet.resolution,
            "mflops": count_flops(subnet, space), "params": count_params(subnet, space), **vals,
            "generation": generation}


def _values_of(row: Mapping[str, Any]) -> list[float]:
    return [_num(row.get(f)) for f in NUMERIC_FIELDS]


def run_search(evaluate_fn: Callable[[SubnetConfig], Mapping[str, Any]], space: Any, cfg: Any, workdir: str,
               *, preset_results: Mapping[str, Mapping[str, Any]] | None = None, comm: Any = None,
               log: Callable[[str], None] | None = None, plot: bool = True) -> list[dict]:
    """Runs (or resumes) the evolutionary search; returns the front: one row per FLOPs bucket
    (sorted by MFLOPs) with subnet, resolution, mflops, params, top1, top5, loss, count,
    generation (first seen), bucket and non_dominated.

    `evaluate_fn(subnet)` calibrates and evaluates one subnet and returns a dict with
    'top1' (and optionally 'top5', 'loss', 'count'); see `evaluate.make_evaluate_fn`.
    `cfg`: a `SearchConfig`, dict or ConfigDict with its keys. `comm`: the process
    collectives (default: `JaxComm` when jax runs several processes).
    `preset_results`: {preset name: row with mflops and top1} to mark in the plot.
    """
    space = get_space(space)
    cfg = SearchConfig.from_any(cfg)
    log = log or logging.info
    if comm is None:
        import jax

        comm = JaxComm() if jax.process_count() > 1 else _SingleComm()
    pidx, pcount = comm.process_index, comm.process_count
    lead = pidx == 0
    os.makedirs(workdir, exist_ok=True)
    store = ResultStore(os.path.join(workdir, RESULTS_FILE), writable=lead, read=lead)
    if lead:
        _write_config(workdir, space, cfg, log)
        if store.rows:
            log(f"evo search: resuming, {len(store.rows)} evaluated subnets read from {store.path}")

    nf = len(NUMERIC_FIELDS)
    buckets: dict[float, dict] = {}
    first_seen: dict[str, int] = {}
    population = initial_population(space, cfg)
    for gen in range(cfg.evo_iter):
        keys = [canonical_key(s) for s in population]
        uniq: dict[str, SubnetConfig] = {}  # this generation's distinct candidates, in order
        for k, s in zip(keys, population):
            uniq.setdefault(k, s)
            first_seen.setdefault(k, gen)
        ukeys = list(uniq)
        # Process 0 knows which candidates are already evaluated and shares their numbers, so every
        # process continues from bit-identical values.
        known = np.full((len(ukeys), nf + 1), np.nan, np.float64)  # last column: 1 if known
        known[:, nf] = 0
        if lead:
            for i, k in enumerate(ukeys):
                r = store.get(k)
                if r is not None:
                    known[i, :nf] = _values_of(r)
                    known[i, nf] = 1
        if pcount > 1:
            known = comm.broadcast(known)
        todo = [i for i in range(len(ukeys)) if known[i, nf] == 0]
        values = known[:, :nf].copy()
        t0 = time.perf_counter()
        for j, i in enumerate(todo):
            if j % pcount != pidx:
                continue
            s = uniq[ukeys[i]]
            t = time.perf_counter()
            res = dict(evaluate_fn(s))
            res.setdefault("seconds", time.perf_counter() - t)
            vals = _values_of(res)
            if math.isnan(vals[0]):
                raise ValueError(f"evaluate_fn returned no finite 'top1' for subnet {ukeys[i]}: {res}")
            values[i] = vals
            if lead:  # recorded at once: a crash loses at most the candidate in flight
                store.add(_row(s, space, vals, gen))
        if pcount > 1 and todo:
            # Fixed-size exchange: [n, F] per process, NaN where the process did not evaluate.
            gathered = comm.allgather(np.where(known[:, nf:] > 0, np.nan, values))  # [P, n, F]
            for j, i in enumerate(todo):
                values[i] = gathered[j % pcount, i]
                if lead:
                    store.add(_row(uniq[ukeys[i]], space, values[i], gen))
        rows = {k: _row(uniq[k], space, values[i], first_seen[k]) for i, k in enumerate(ukeys)}
        pareto_buckets([rows[k] for k in keys], cfg.flops_step, buckets)
        best = max(buckets.values(), key=lambda r: r["top1"])
        log(f"evo search: generation {gen + 1}/{cfg.evo_iter}: {len(population)} candidates, "
            f"{len(todo)} evaluated ({time.perf_counter() - t0:.1f}s), {len(ukeys) - len(todo)} known, "
            f"{len(buckets)} buckets, best top-1 {best['top1']:.2f} at {best['mflops']:.1f} MFLOPs")
        if lead:
            write_outputs(workdir, _front(buckets), None, None, plot=False)
        if gen + 1 < cfg.evo_iter:
            parents = [SubnetConfig.from_dict(buckets[b]["subnet"]) for b in sorted(buckets)]
            population = next_population(parents, space, cfg, gen + 1)
    front = _front(buckets)
    if lead:
        write_outputs(workdir, front, list(store.rows.values()), preset_results, plot=plot)
    return front


def _front(buckets: Mapping[float, dict]) -> list[dict]:
    rows = []
    for b in sorted(buckets):
        # Timings are left out so that the front is a function of the search alone.
        r = {k: v for k, v in buckets[b].items() if k not in ("key", "seconds")}
        r["bucket"] = b
        rows.append(r)
    for r, nd in zip(rows, non_dominated(rows)):
        r["non_dominated"] = nd
    return rows


def _write_config(workdir: str, space: SearchSpace, cfg: SearchConfig, log) -> None:
    path = os.path.join(workdir, "search_config.json")
    meta = {"search": cfg.to_dict(), "space": space.to_dict()}
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except ValueError:
            old = None
        if old is not None and old != meta:
            warnings.warn(f"{path}: the search config or space differs from the previous run's; the "
                          f"evaluations stored in {RESULTS_FILE} are reused as they are")
    _atomic_write(path, json.dumps(meta, indent=1))


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------

CSV_FIELDS = ("subnet", "mflops", "params", "top1", "top5")


def write_outputs(workdir: str, front: Sequence[Mapping[str, Any]], evaluated: Sequence[Mapping] | None,
                  preset_results: Mapping[str, Mapping[str, Any]] | None, plot: bool = True) -> None:
    """pareto.json (the rows), pareto.csv (subnet JSON, mflops, params, top1, top5) and, with
    `plot`, pareto.png."""
    _atomic_write(os.path.join(workdir, "pareto.json"), json.dumps(list(front), indent=1))
    tmp = os.path.join(workdir, "pareto.csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for r in front:
            w.writerow([json.dumps(r["subnet"], sort_keys=True, separators=(",", ":")), r["mflops"], r["params"],
                        r["top1"], r["top5"]])
    os.replace(tmp, os.path.join(workdir, "pareto.csv"))
    if plot:
        plot_pareto(os.path.join(workdir, "pareto.png"), front, evaluated or [], preset_results)


def plot_pareto(path: str, front: Sequence[Mapping[str, Any]], evaluated: Sequence[Mapping[str, Any]],
                preset_results: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Top-1 vs MFLOPs: every evaluated candidate, the bucket winners and the non-dominated front,
    and the A0..A6 presets where `preset_results` gives them."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 5), dpi=120)
    FigureCanvasAgg(fig)  # the Agg backend, without touching pyplot's global state
    ax = fig.add_subplot(1, 1, 1)
    if evaluated:
        ax.scatter([r["mflops"] for r in evaluated], [r["top1"] for r in evaluated], s=8, c="0.7",
                   label=f"evaluated ({len(evaluated)})")
    if front:
        ax.scatter([r["mflops"] for r in front], [r["top1"] for r in front], s=14, c="tab:blue",
                   label="bucket winners")
        nd = [r for r in front if r.get("non_dominated", True)]
        ax.plot([r["mflops"] for r in nd], [r["top1"] for r in nd], "-o", c="tab:red", ms=4, label="Pareto front")
    for name, r in (preset_results or {}).items():
        key = name.lower()
        title = PRESET_TITLES.get(key, name)
        ax.scatter([r["mflops"]], [r["top1"]], marker="*", s=120, c="tab:green", zorder=5)
        ax.annotate(title.replace("AlphaNet-", ""), (r["mflops"], r["top1"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    if preset_results:
        ax.scatter([], [], marker="*", s=120, c="tab:green", label="AlphaNet presets")
    ax.set_xlabel("MFLOPs")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("evolutionary search")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    os.replace(tmp, path)


def evaluate_presets(evaluate_fn: Callable[[SubnetConfig], Mapping[str, Any]], space: Any = None,
                     names: Sequence[str] | None = None) -> dict[str, dict]:
    """{name: row} for the AlphaNet presets (A0..A6), for `run_search(preset_results=...)`."""
    space = get_space(space)
    out = {}
    for name in names or list(PRESETS):
        s = SubnetConfig.from_dict(PRESETS[name], space)
        row = dict(evaluate_fn(s))
        row.setdefault("mflops", count_flops(s, space))
        row.setdefault("subnet", s.to_dict())
        out[name] = row
    return out
