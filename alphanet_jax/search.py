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
  its stored result is reused, but only when it was made in the same evaluation context
  (below). The reference re-evaluates duplicates.
* The reference drops the last `len % world` candidates so that its all-gather has an
  equal count per rank; here nothing is dropped: the results travel as a fixed-size
  numeric array with NaN for the candidates a host did not evaluate.
* Parents are drawn from the bucket winners in bucket order (sorted by MFLOPs), not
  dict-insertion order.
* The final front is written to files (the reference only logs it).

Workdir files (`evaluated.jsonl`, `pareto.json`, `pareto.csv`, `pareto.png`, `search_config.json`) and
evaluation contexts (`run_search(context=...)`): see `search_results`.

Multi-host: every host runs `run_search` with the same arguments. Candidate i of a
generation is evaluated by the host with i % process_count == process_index; the
evaluator itself is data-parallel over that host's devices (use
`evaluate.local_mesh()` and unsharded iterators). Process 0 owns the files: it reads
`evaluated.jsonl` and broadcasts which candidates are already known, and it writes
all outputs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from alphanet_jax import console, errors
from alphanet_jax.flops import count_flops, count_params
from alphanet_jax.evolution import crossover, mutate, sample_subnet_in_range
from alphanet_jax.presets import PRESETS
from alphanet_jax.sampling import step_rng
from alphanet_jax.search_results import (RESULTS_FILE, ResultStore, context_id, other_context_message,
                                         plain_context, write_outputs, write_search_config)
from alphanet_jax.search_space import SearchSpace, SubnetConfig, get_space

__all__ = ["SearchConfig", "run_search", "default_config", "canonical_key", "pareto_buckets", "bucket_of",
           "non_dominated", "JaxComm", "STREAM"]

STREAM = 9  # step_rng stream of the evolutionary search (distinct from training's sampler)
NUMERIC_FIELDS = ("top1", "top5", "loss", "count", "seconds")
_CONFIG_KEYS = ("parent_popu_size", "mutate_size", "crossover_size", "mutate_prob", "evo_iter", "flops_min",
                "flops_max", "flops_step", "seed")
OBJECTIVES = {"flops": "mflops", "latency": "latency_ms"}  # objective -> the row field it buckets


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
    # objective "latency": buckets of `latency_step` ms of predicted latency (a latency table, see
    # `latency_measure`) instead of MFLOPs, and candidates over `max_latency_ms` (0: no budget) rejected.
    objective: str = "flops"
    max_latency_ms: float = 0.0
    latency_step: float = 1.0

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
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {self.objective!r}")
        if not (isinstance(self.max_latency_ms, (int, float)) and self.max_latency_ms >= 0):
            raise ValueError(f"max_latency_ms must be a number >= 0 (0: no budget), got {self.max_latency_ms!r}")
        if not (isinstance(self.latency_step, (int, float)) and self.latency_step > 0):
            raise ValueError(f"latency_step must be > 0, got {self.latency_step!r}")

    @property
    def cost_key(self) -> str:
        """The row field that the buckets, the front and the plot use: mflops or latency_ms."""
        return OBJECTIVES[self.objective]

    @property
    def bucket_step(self) -> float:
        return self.latency_step if self.objective == "latency" else self.flops_step

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
                   buckets: dict[float, dict] | None = None, key: str = "mflops") -> dict[float, dict]:
    """Updates {bucket: row} with `rows` in order: a row replaces its bucket's winner only if its
    top-1 is strictly higher (rows with NaN top-1 never win)."""
    buckets = {} if buckets is None else buckets
    for row in rows:
        top1 = row["top1"]
        if top1 is None or (isinstance(top1, float) and math.isnan(top1)):
            continue
        b = bucket_of(row[key], step)
        if b not in buckets or top1 > buckets[b]["top1"]:
            buckets[b] = dict(row)
    return buckets


def non_dominated(rows: Sequence[Mapping[str, Any]], key: str = "mflops") -> list[bool]:
    """For each row: no other row has <= cost (MFLOPs) and > top-1, or < cost and >= top-1."""
    out = []
    for r in rows:
        dom = any((o[key] <= r[key] and o["top1"] > r["top1"])
                  or (o[key] < r[key] and o["top1"] >= r["top1"]) for o in rows)
        out.append(not dom)
    return out


def _in_window(subnet: SubnetConfig, space: SearchSpace, cfg: SearchConfig,
               latency_fn: Callable[[SubnetConfig], float] | None = None) -> bool:
    return cfg.flops_min <= count_flops(subnet, space) <= cfg.flops_max and _in_budget(subnet, cfg, latency_fn)


def _in_budget(subnet: SubnetConfig, cfg: SearchConfig, latency_fn: Callable[[SubnetConfig], float] | None) -> bool:
    return latency_fn is None or not cfg.max_latency_ms or latency_fn(subnet) <= cfg.max_latency_ms


def check_latency_budget(space: SearchSpace, cfg: SearchConfig, latency_fn: Callable[[SubnetConfig], float]) -> None:
    """A ConfigError when even the min subnet is predicted over `max_latency_ms` (no subnet meets it)."""
    if cfg.max_latency_ms and latency_fn(space.min_subnet()) > cfg.max_latency_ms:
        raise errors.ConfigError(f"search.max_latency_ms = {cfg.max_latency_ms} ms: no subnet meets it, the "
                                 f"smallest (min) subnet is predicted at {latency_fn(space.min_subnet()):.3f} ms "
                                 f"on this latency table; raise the budget")


def initial_population(space: SearchSpace, cfg: SearchConfig,
                       latency_fn: Callable[[SubnetConfig], float] | None = None) -> list[SubnetConfig]:
    """The min subnet, then parent_popu_size - 1 uniform subnets in the FLOPs window (and latency budget)."""
    rng = step_rng(cfg.seed, 0, STREAM)
    pop = [space.min_subnet()]
    for _ in range(cfg.parent_popu_size - 1):
        for _ in range(cfg.max_resample):
            s = sample_subnet_in_range(space, rng, cfg.flops_min, cfg.flops_max, max_tries=cfg.max_resample)
            if _in_budget(s, cfg, latency_fn):
                break
        else:
            raise errors.ConfigError(f"search.max_latency_ms = {cfg.max_latency_ms} ms: no subnet drawn in the "
                                     f"FLOPs window [{cfg.flops_min}, {cfg.flops_max}] met it after "
                                     f"{cfg.max_resample} draws; raise the budget or change the window")
        pop.append(s)
    return pop


def next_population(parents: Sequence[SubnetConfig], space: SearchSpace, cfg: SearchConfig,
                    generation: int, latency_fn: Callable[[SubnetConfig], float] | None = None) -> list[SubnetConfig]:
    """mutate_size mutants then crossover_size children of `parents` (the sorted bucket winners),
    each redrawn (parents included) until its MFLOPs are in the window."""
    if not parents:
        raise RuntimeError("the Pareto buckets are empty: no candidate was evaluated with a finite top-1")
    rng = step_rng(cfg.seed, generation, STREAM)
    out: list[SubnetConfig] = []

    def draw(make: Callable[[], SubnetConfig], what: str) -> SubnetConfig:
        for _ in range(cfg.max_resample):
            child = make()
            if _in_window(child, space, cfg, latency_fn):
                return child
        raise RuntimeError(f"no {what} with MFLOPs in [{cfg.flops_min}, {cfg.flops_max}] after "
                           f"{cfg.max_resample} draws (generation {generation})")

    for _ in range(cfg.mutate_size):
        out.append(draw(lambda: mutate(rng.choice(parents), space, rng, cfg.mutate_prob), "mutant"))
    for _ in range(cfg.crossover_size):
        out.append(draw(lambda: crossover(rng.choice(parents), rng.choice(parents), rng), "crossover child"))
    return out


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


def _row(subnet: SubnetConfig, space: SearchSpace, values: Sequence[float], generation: int,
         latency_fn: Callable[[SubnetConfig], float] | None = None) -> dict:
    # Missing numbers become null (strict JSON); top1 is always finite.
    vals = {f: (None if math.isnan(float(v)) else float(v)) for f, v in zip(NUMERIC_FIELDS, values)}
    if vals["count"] is not None:
        vals["count"] = int(vals["count"])
    if latency_fn is not None:  # the predicted latency (ms) from the search's latency table
        vals["latency_ms"] = float(latency_fn(subnet))
    return {"key": canonical_key(subnet), "subnet": subnet.to_dict(), "resolution": subnet.resolution,
            "mflops": count_flops(subnet, space), "params": count_params(subnet, space), **vals,
            "generation": generation}


def _values_of(row: Mapping[str, Any]) -> list[float]:
    return [_num(row.get(f)) for f in NUMERIC_FIELDS]


def run_search(evaluate_fn: Callable[[SubnetConfig], Mapping[str, Any]], space: Any, cfg: Any, workdir: str,
               *, preset_results: Mapping[str, Mapping[str, Any]] | None = None, comm: Any = None,
               log: Callable[[str], None] | None = None, plot: bool = True,
               context: Mapping[str, Any] | None = None,
               latency_fn: Callable[[SubnetConfig], float] | None = None) -> list[dict]:
    """Runs (or resumes) the evolutionary search; returns the front: one row per FLOPs bucket
    (sorted by MFLOPs) with subnet, resolution, mflops, params, top1, top5, loss, count,
    generation (first seen), bucket and non_dominated.

    `evaluate_fn(subnet)` calibrates and evaluates one subnet and returns a dict with
    'top1' (and optionally 'top5', 'loss', 'count'); see `evaluate.make_evaluate_fn`.
    `cfg`: a `SearchConfig`, dict or ConfigDict with its keys. `comm`: the process
    collectives (default: `JaxComm` when jax runs several processes). `log`: where progress lines
    go (default: `console.log`, printed by process 0).
    `preset_results`: {preset name: row with mflops and top1} to mark in the plot.
    `context`: what `evaluate_fn`'s numbers depend on besides the subnet (JSON; the weights and the
    calibration/evaluation settings, see the module docstring): stored results are reused only when
    they were made in the same context. The same on every process.
    `latency_fn(subnet) -> ms` (a latency table's predictor) is needed with `objective="latency"`:
    rows get `latency_ms`, the buckets are of predicted ms and candidates keep within `max_latency_ms`.
    """
    space = get_space(space)
    context = plain_context(context)
    cfg = SearchConfig.from_any(cfg)
    if cfg.objective == "latency":
        if latency_fn is None:
            raise ValueError("search objective 'latency' needs latency_fn (a latency table's predictor)")
        check_latency_budget(space, cfg, latency_fn)
    key = cfg.cost_key
    log = log or console.log
    if comm is None:
        comm = _default_comm()
    lead = comm.process_index == 0
    store = _open_store(workdir, space, cfg, context, log, lead)

    nf = len(NUMERIC_FIELDS)
    buckets: dict[float, dict] = {}
    first_seen: dict[str, int] = {}
    population = initial_population(space, cfg, latency_fn)
    for gen in range(cfg.evo_iter):
        keys = [canonical_key(s) for s in population]
        uniq: dict[str, SubnetConfig] = {}  # this generation's distinct candidates, in order
        for k, s in zip(keys, population):
            uniq.setdefault(k, s)
            first_seen.setdefault(k, gen)
        ukeys = list(uniq)
        known = _known_values(store, ukeys, comm)
        todo = [i for i in range(len(ukeys)) if known[i, nf] == 0]
        t0 = time.perf_counter()
        values = _evaluate_candidates(evaluate_fn, uniq, ukeys, known, todo, store, space, gen, comm)
        rows = {k: _row(uniq[k], space, values[i], first_seen[k], latency_fn) for i, k in enumerate(ukeys)}
        pareto_buckets([rows[k] for k in keys], cfg.bucket_step, buckets, key=key)
        best = max(buckets.values(), key=lambda r: r["top1"])
        log(f"evo search: generation {gen + 1}/{cfg.evo_iter}: {len(population)} candidates, "
            f"{len(todo)} evaluated ({time.perf_counter() - t0:.1f}s), {len(ukeys) - len(todo)} known, "
            f"{len(buckets)} buckets, best top-1 {best['top1']:.2f} at {best['mflops']:.1f} MFLOPs"
            + (f", {best['latency_ms']:.3f} ms predicted" if latency_fn is not None else ""))
        if lead:
            write_outputs(workdir, _front(buckets, key), None, None, plot=False, context=context)
        if gen + 1 < cfg.evo_iter:
            parents = [SubnetConfig.from_dict(buckets[b]["subnet"]) for b in sorted(buckets)]
            population = next_population(parents, space, cfg, gen + 1, latency_fn)
    front = _front(buckets, key)
    if lead:
        evaluated = list(store.rows.values())
        if latency_fn is not None:
            evaluated = [dict(r, latency_ms=latency_fn(SubnetConfig.from_dict(r["subnet"]))) for r in evaluated]
        write_outputs(workdir, front, evaluated, preset_results, plot=plot, context=context, key=key)
    return front


def _default_comm() -> Any:
    """`JaxComm` when jax runs several processes, else the single-process stand-in."""
    import jax

    return JaxComm() if jax.process_count() > 1 else _SingleComm()


def _open_store(workdir: str, space: SearchSpace, cfg: SearchConfig, context: dict | None,
                log: Callable[[str], None], lead: bool) -> ResultStore:
    """The workdir's results file (read and written by process 0 only, which also writes
    search_config.json and says what it resumes from)."""
    os.makedirs(workdir, exist_ok=True)
    store = ResultStore(os.path.join(workdir, RESULTS_FILE), writable=lead, read=lead, context=context_id(context))
    if lead:
        contexts = write_search_config(workdir, space, cfg.to_dict(), context, log)
        if store.rows:
            log(f"evo search: resuming, {len(store.rows)} evaluated subnets read from {store.path}")
        if store.other:
            log(other_context_message(store, contexts, context))
    return store


def _known_values(store: ResultStore, ukeys: Sequence[str], comm: Any) -> np.ndarray:
    """[n, F + 1]: the stored numbers of the candidates `ukeys` (NaN where unknown), last column 1 if known.

    Process 0 knows which candidates are already evaluated and shares their numbers, so every
    process continues from bit-identical values."""
    nf = len(NUMERIC_FIELDS)
    known = np.full((len(ukeys), nf + 1), np.nan, np.float64)  # last column: 1 if known
    known[:, nf] = 0
    if comm.process_index == 0:
        for i, k in enumerate(ukeys):
            r = store.get(k)
            if r is not None:
                known[i, :nf] = _values_of(r)
                known[i, nf] = 1
    if comm.process_count > 1:
        known = comm.broadcast(known)
    return known


def _evaluate_candidates(evaluate_fn: Callable[[SubnetConfig], Mapping[str, Any]], uniq: Mapping[str, SubnetConfig],
                         ukeys: Sequence[str], known: np.ndarray, todo: Sequence[int], store: ResultStore,
                         space: SearchSpace, gen: int, comm: Any) -> np.ndarray:
    """[n, F]: the numbers of every candidate, `known` ones as given, those in `todo` evaluated (spread
    over the processes, then exchanged); process 0 records each new row at once."""
    nf = len(NUMERIC_FIELDS)
    pidx, pcount = comm.process_index, comm.process_count
    lead = pidx == 0
    values = known[:, :nf].copy()
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
    return values


def _front(buckets: Mapping[float, dict], key: str = "mflops") -> list[dict]:
    rows = []
    for b in sorted(buckets):
        # Timings are left out so that the front is a function of the search alone.
        r = {k: v for k, v in buckets[b].items() if k not in ("key", "seconds")}
        r["bucket"] = b
        rows.append(r)
    for r, nd in zip(rows, non_dominated(rows, key)):
        r["non_dominated"] = nd
    return rows


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
