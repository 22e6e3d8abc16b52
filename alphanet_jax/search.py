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

Workdir files: `evaluated.jsonl` (one JSON line per evaluated subnet, flushed and
fsynced; read back on restart; a truncated last line from a crash is dropped with a
warning), `pareto.json`, `pareto.csv`, `pareto.png` and `search_config.json`.

Evaluation context: `run_search(context=...)` takes a JSON dict of what produced the
numbers besides the subnet: the weights (`weights.source` path, `weights.step`,
`weights.fingerprint`, a content hash from `alphanet_jax.fingerprint`) and the
calibration/evaluation data settings (see `tasks.search_context`). Every row of
`evaluated.jsonl` stores its `context_id(context)` (a hash of everything but the weights'
path and step: the weights are identified by their content); `search_config.json` keeps the full
dict of every context seen (`contexts`). On resume only rows of the current context are
reused; rows made with other weights or settings (or by an older version, without a
context) are kept in the file but not reused: their candidates are evaluated again, and
one log line says how many and what differs (e.g. `weights.step 40 -> 20`). Going back to
earlier weights reuses that context's rows again. `pareto.json` is
`{"context_id", "context", "front": [rows]}`; `read_front` checks it (a clear
`SearchResultsError` naming the file when it is malformed) and `check_front_context`
refuses a front made in another context (the export task picks from the front).

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
import hashlib
import io
import json
import math
import os
import time
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from alphanet_jax import console, errors
from alphanet_jax.files import atomic_write, save_figure
from alphanet_jax.flops import count_flops, count_params
from alphanet_jax.evolution import crossover, mutate, sample_subnet_in_range
from alphanet_jax.presets import PRESET_TITLES, PRESETS
from alphanet_jax.sampling import step_rng
from alphanet_jax.search_space import SearchSpace, SubnetConfig, get_space

__all__ = ["SearchConfig", "run_search", "default_config", "canonical_key", "pareto_buckets", "bucket_of",
           "ResultStore", "write_outputs", "plot_pareto", "non_dominated", "JaxComm", "STREAM", "SearchResultsError",
           "context_id", "context_difference", "read_front", "check_front_context"]

STREAM = 9  # step_rng stream of the evolutionary search (distinct from training's sampler)
RESULTS_FILE = "evaluated.jsonl"
NUMERIC_FIELDS = ("top1", "top5", "loss", "count", "seconds")
_CONFIG_KEYS = ("parent_popu_size", "mutate_size", "crossover_size", "mutate_prob", "evo_iter", "flops_min",
                "flops_max", "flops_step", "seed")
OBJECTIVES = {"flops": "mflops", "latency": "latency_ms"}  # objective -> the row field it buckets
FRONT_KEYS = ("subnet", "mflops", "top1")  # what a pareto.json row needs (for the export's pick)
_CONTEXT_INFO_KEYS = ("weights.source", "weights.step")  # recorded, not part of the identity (the fingerprint is)


class SearchResultsError(errors.UserError):
    """A search results file (pareto.json, evaluated.jsonl) that is malformed, or that was made with
    other weights or settings than the ones at hand."""


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
# Evaluation context: what produced the numbers besides the subnet
# ----------------------------------------------------------------------------


def _plain(context: Mapping[str, Any] | None) -> dict | None:
    """The context as JSON reads it back (tuples become lists), so that stored and fresh ones compare."""
    return None if context is None else json.loads(json.dumps(context))


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def context_id(context: Mapping[str, Any] | None) -> str | None:
    """A 16-hex-digit hash of the context without `weights.source` and `weights.step` (weights count by
    their content); None for no context."""
    if context is None:
        return None
    ident = {k: v for k, v in _flat(_plain(context)).items() if k not in _CONTEXT_INFO_KEYS}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _show(v: Any) -> str:
    if isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v):
        return v[:12]  # a sha256 fingerprint
    return json.dumps(v)


def context_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """'key old -> new, ...' over the (dotted) fields that differ, e.g. 'weights.step 40 -> 20'."""
    a, b = _flat(_plain(old)), _flat(_plain(new))
    keys = list(b) + [k for k in a if k not in b]
    diffs = [f"{k} {_show(a[k]) if k in a else '(absent)'} -> {_show(b[k]) if k in b else '(absent)'}"
             for k in keys if a.get(k, ...) != b.get(k, ...)]
    return ", ".join(diffs) or "no difference"


def read_front(path: str, space: Any = None) -> tuple[list[dict], dict | None]:
    """(front rows, context) of a `pareto.json`; a `SearchResultsError` naming the file when it is
    not JSON, not a front, or a row lacks `subnet`/`mflops`/`top1` (or, with `space`, holds a subnet
    that is not valid in it). A file of an older version (a bare list) has context None."""
    fix = "rerun the search (--mode=search) to rewrite it"
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise SearchResultsError(f"{path} is not a valid JSON file ({e}); {fix}") from None
    if isinstance(doc, list):
        front, context = doc, None
    elif isinstance(doc, dict) and isinstance(doc.get("front"), list):
        front, context = doc["front"], doc.get("context")
    else:
        raise SearchResultsError(f"{path} is not a search front: expected an object with a 'front' list of rows; {fix}")
    if context is not None and not isinstance(context, dict):
        raise SearchResultsError(f"{path}: 'context' must be an object, got {type(context).__name__}; {fix}")
    if not front:
        raise SearchResultsError(f"{path} holds an empty front; {fix}")
    space = None if space is None else get_space(space)
    for i, row in enumerate(front):
        if not isinstance(row, dict):
            raise SearchResultsError(f"{path}: front row {i} is a {type(row).__name__}, not an object; {fix}")
        missing = [k for k in FRONT_KEYS if k not in row]
        if missing:
            raise SearchResultsError(f"{path}: front row {i} lacks {missing} (every row needs "
                                     f"{list(FRONT_KEYS)}); {fix}")
        for k in ("mflops", "top1"):
            if isinstance(row[k], bool) or not isinstance(row[k], (int, float)):
                raise SearchResultsError(f"{path}: front row {i}: {k!r} must be a number, got {row[k]!r}; {fix}")
        if not isinstance(row["subnet"], dict):
            raise SearchResultsError(f"{path}: front row {i}: 'subnet' must be an object, got {row['subnet']!r}; {fix}")
        if space is not None:
            try:
                SubnetConfig.from_dict(row["subnet"], space)
            except (ValueError, TypeError, KeyError) as e:
                raise SearchResultsError(f"{path}: front row {i}: {e}") from None
    return front, context


def check_front_context(path: str, stored: Mapping[str, Any] | None, current: Mapping[str, Any]) -> None:
    """Refuses (`SearchResultsError`) a front that was not made with the weights and settings of
    `current`: its picks would not be the best for them."""
    fix = ("rerun the search with these weights and settings (--mode=search), or name the subnet with "
           "--config.export.subnet")
    if stored is None:
        raise SearchResultsError(f"{path} does not record the weights and settings its front was evaluated with "
                                 f"(it was written by an older version); {fix}")
    if context_id(stored) != context_id(current):
        raise SearchResultsError(f"{path} was evaluated with other weights or settings than these "
                                 f"({context_difference(stored, current)}); {fix}")


# ----------------------------------------------------------------------------
# The results file
# ----------------------------------------------------------------------------


class ResultStore:
    """`evaluated.jsonl`: one JSON object per evaluated subnet, keyed by `canonical_key`.

    `context`: the `context_id` of this run; `rows` holds the rows made in it (the first per key),
    `other` the first row per key made only in other contexts (not reused). Rows added get
    `context` (when it is not None)."""

    def __init__(self, path: str, writable: bool = True, read: bool = True, context: str | None = None):
        self.path = path
        self.writable = writable
        self.context = context
        self.rows: dict[str, dict] = {}
        self.other: dict[str, dict] = {}
        if read:
            self._load()
            for key in self.rows:
                self.other.pop(key, None)

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
                raise SearchResultsError(f"{self.path}: line {i + 1} is not a valid result record ({e}); "
                                         f"the file is corrupt") from None
            (self.rows if row.get("context") == self.context else self.other).setdefault(key, row)
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
        if self.context is not None:
            row = dict(row, context=self.context)
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
    context = _plain(context)
    cfg = SearchConfig.from_any(cfg)
    if cfg.objective == "latency":
        if latency_fn is None:
            raise ValueError("search objective 'latency' needs latency_fn (a latency table's predictor)")
        check_latency_budget(space, cfg, latency_fn)
    key = cfg.cost_key
    log = log or console.log
    if comm is None:
        import jax

        comm = JaxComm() if jax.process_count() > 1 else _SingleComm()
    pidx, pcount = comm.process_index, comm.process_count
    lead = pidx == 0
    os.makedirs(workdir, exist_ok=True)
    store = ResultStore(os.path.join(workdir, RESULTS_FILE), writable=lead, read=lead, context=context_id(context))
    if lead:
        contexts = _write_config(workdir, space, cfg, context, log)
        if store.rows:
            log(f"evo search: resuming, {len(store.rows)} evaluated subnets read from {store.path}")
        if store.other:
            log(_other_context_message(store, contexts, context))

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


def _other_context_message(store: ResultStore, contexts: Mapping[str, dict], context: dict | None) -> str:
    counts: dict[str | None, int] = {}
    for row in store.other.values():
        counts[row.get("context")] = counts.get(row.get("context"), 0) + 1
    parts = []
    for cid, n in counts.items():
        if cid is None:
            why = "no record of their weights and settings (written by an older version)"
        elif cid not in contexts:
            why = f"context {cid}, whose record is missing from search_config.json"
        elif context is None:
            why = "recorded weights and settings, while this search gives none"
        else:
            why = context_difference(contexts[cid], context)
        parts.append(f"{n} with {why}")
    return (f"evo search: {len(store.other)} stored results in {store.path} were made with other weights or "
            f"settings and are not reused (candidates are evaluated anew): {'; '.join(parts)}")


def _write_config(workdir: str, space: SearchSpace, cfg: SearchConfig, context: dict | None, log) -> dict:
    """Writes search_config.json; returns every context recorded so far {id: context}, this one included."""
    path = os.path.join(workdir, "search_config.json")
    meta: dict[str, Any] = {"search": cfg.to_dict(), "space": space.to_dict()}
    contexts: dict[str, dict] = {}
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except ValueError:
            old = None
        if isinstance(old, dict) and isinstance(old.get("contexts"), dict):
            contexts.update(old["contexts"])
        if isinstance(old, dict) and {k: old.get(k) for k in meta} != meta:
            warnings.warn(f"{path}: the search config or space differs from the previous run's; the "
                          f"evaluations stored in {RESULTS_FILE} for the same weights and settings are reused")
    if context is not None:
        contexts[context_id(context)] = context
    meta.update(context_id=context_id(context), contexts=contexts)
    atomic_write(path, json.dumps(meta, indent=1))
    return contexts


# ----------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------

CSV_FIELDS = ("subnet", "mflops", "params", "top1", "top5")


def write_outputs(workdir: str, front: Sequence[Mapping[str, Any]], evaluated: Sequence[Mapping] | None,
                  preset_results: Mapping[str, Mapping[str, Any]] | None, plot: bool = True,
                  context: Mapping[str, Any] | None = None, key: str = "mflops") -> None:
    """pareto.json ({context_id, context, front: the rows}), pareto.csv (subnet JSON, mflops, params,
    top1, top5) and, with `plot`, pareto.png."""
    doc = {"context_id": context_id(context), "context": _plain(context), "front": list(front)}
    atomic_write(os.path.join(workdir, "pareto.json"), json.dumps(doc, indent=1))
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(CSV_FIELDS)
    for r in front:
        w.writerow([json.dumps(r["subnet"], sort_keys=True, separators=(",", ":")), r["mflops"], r["params"],
                    r["top1"], r["top5"]])
    atomic_write(os.path.join(workdir, "pareto.csv"), text.getvalue().encode())
    if plot:
        plot_pareto(os.path.join(workdir, "pareto.png"), front, evaluated or [], preset_results, key=key)


def plot_pareto(path: str, front: Sequence[Mapping[str, Any]], evaluated: Sequence[Mapping[str, Any]],
                preset_results: Mapping[str, Mapping[str, Any]] | None = None, key: str = "mflops") -> None:
    """Top-1 vs MFLOPs (or `key`, e.g. latency_ms): every evaluated candidate, the bucket winners and the
    non-dominated front, and the A0..A6 presets where `preset_results` gives them (with that key)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 5), dpi=120)
    FigureCanvasAgg(fig)  # the Agg backend, without touching pyplot's global state
    ax = fig.add_subplot(1, 1, 1)
    if evaluated:
        ax.scatter([r[key] for r in evaluated], [r["top1"] for r in evaluated], s=8, c="0.7",
                   label=f"evaluated ({len(evaluated)})")
    if front:
        ax.scatter([r[key] for r in front], [r["top1"] for r in front], s=14, c="tab:blue",
                   label="bucket winners")
        nd = [r for r in front if r.get("non_dominated", True)]
        ax.plot([r[key] for r in nd], [r["top1"] for r in nd], "-o", c="tab:red", ms=4, label="Pareto front")
    for name, r in (preset_results or {}).items():
        if key not in r:
            continue
        title = PRESET_TITLES.get(name.lower(), name)
        ax.scatter([r[key]], [r["top1"]], marker="*", s=120, c="tab:green", zorder=5)
        ax.annotate(title.replace("AlphaNet-", ""), (r[key], r["top1"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    if preset_results:
        ax.scatter([], [], marker="*", s=120, c="tab:green", label="AlphaNet presets")
    ax.set_xlabel("MFLOPs" if key == "mflops" else "predicted latency (ms)" if key == "latency_ms" else key)
    ax.set_ylabel("top-1 (%)")
    ax.set_title("evolutionary search")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, path)


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
