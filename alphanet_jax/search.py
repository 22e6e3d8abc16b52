"""Evolutionary search over subnets for the best accuracy per FLOPs bucket (spec §9).

Follows `AlphaNet:parallel_supernet_evo_search.py`:

* initial population (`evolution.initial_population`): the min subnet, then `parent_popu_size - 1`
  uniform subnets with MFLOPs inside [flops_min, flops_max] (rejection sampling);
* every generation: evaluate the candidates (BN calibration + evaluation, done by
  the user's `evaluate_fn(subnet) -> dict with 'top1'`), then update the Pareto
  buckets: bucket = round(mflops / flops_step) * flops_step (Python round), each
  bucket keeps the candidate with the highest top-1 (a later one replaces it only
  when strictly better; `pareto`);
* the next population (`evolution.next_population`) is `mutate_size` mutants (parent drawn uniformly from the
  bucket winners, `mutate(prob=mutate_prob)`, parent and mutation redrawn until the
  child's MFLOPs are in the window) followed by `crossover_size` children (two
  parents, `crossover`, redrawn until in the window).

Differences from the reference, all deliberate:

* Randomness comes only from `step_rng(seed, generation, evolution.STREAM)` (a fresh
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

The settings: `search_config.SearchConfig`. Workdir files (`evaluated.jsonl`, `pareto.json`, `pareto.csv`,
`pareto.png`, `search_config.json`) and evaluation contexts (`run_search(context=...)`): see `search_results`.

Multi-host: every host runs `run_search` with the same arguments. Candidate i of a
generation is evaluated by the host with i % process_count == process_index; the
evaluator itself is data-parallel over that host's devices (use
`evaluate.local_mesh()` and unsharded iterators). Process 0 owns the files: it reads
`evaluated.jsonl` and broadcasts which candidates are already known, and it writes
all outputs. The numbers travel between processes bit for bit (`process_comm`).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from alphanet_jax import console
from alphanet_jax.evolution import check_latency_budget, initial_population, next_population
from alphanet_jax.flops import count_flops, count_params
from alphanet_jax.pareto import front_rows, pareto_buckets
from alphanet_jax.presets import PRESETS
from alphanet_jax.process_comm import default_comm
from alphanet_jax.search_config import SearchConfig
from alphanet_jax.search_results import (RESULTS_FILE, ResultStore, canonical_key, context_id, other_context_message,
                                         plain_context, write_outputs, write_search_config)
from alphanet_jax.search_space import SearchSpace, SubnetConfig, get_space

__all__ = ["run_search", "evaluate_presets"]

NUMERIC_FIELDS = ("top1", "top5", "loss", "count", "seconds")


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
    `cfg`: a `SearchConfig`, dict or ConfigDict with its keys. `comm`: the process collectives (default:
    `process_comm.default_comm()`, a `JaxComm` when jax runs several processes). `log`: where progress
    lines go (default: `console.log`, printed by process 0).
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
        comm = default_comm()
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
            write_outputs(workdir, front_rows(buckets, key), None, None, plot=False, context=context)
        if gen + 1 < cfg.evo_iter:
            parents = [SubnetConfig.from_dict(buckets[b]["subnet"]) for b in sorted(buckets)]
            population = next_population(parents, space, cfg, gen + 1, latency_fn)
    front = front_rows(buckets, key)
    if lead:
        evaluated = list(store.rows.values())
        if latency_fn is not None:
            evaluated = [dict(r, latency_ms=latency_fn(SubnetConfig.from_dict(r["subnet"]))) for r in evaluated]
        write_outputs(workdir, front, evaluated, preset_results, plot=plot, context=context, key=key)
    return front


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
