"""The evolutionary search's files and evaluation contexts (spec §9; the search itself is `search`).

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
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import warnings
from typing import Any, Callable, Mapping, Sequence

from alphanet_jax import errors
from alphanet_jax.files import atomic_write, save_figure
from alphanet_jax.presets import PRESET_TITLES
from alphanet_jax.search_space import SearchSpace, SubnetConfig, get_space

__all__ = ["canonical_key", "ResultStore", "write_outputs", "plot_pareto", "SearchResultsError", "context_id",
           "context_difference", "read_front", "check_front_context", "plain_context", "write_search_config",
           "other_context_message"]

RESULTS_FILE = "evaluated.jsonl"
FRONT_KEYS = ("subnet", "mflops", "top1")  # what a pareto.json row needs (for the export's pick)
_CONTEXT_INFO_KEYS = ("weights.source", "weights.step")  # recorded, not part of the identity (the fingerprint is)


class SearchResultsError(errors.UserError):
    """A search results file (pareto.json, evaluated.jsonl) that is malformed, or that was made with
    other weights or settings than the ones at hand."""


# ----------------------------------------------------------------------------
# Evaluation context: what produced the numbers besides the subnet
# ----------------------------------------------------------------------------


def plain_context(context: Mapping[str, Any] | None) -> dict | None:
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
    ident = {k: v for k, v in _flat(plain_context(context)).items() if k not in _CONTEXT_INFO_KEYS}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _show(v: Any) -> str:
    if isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v):
        return v[:12]  # a sha256 fingerprint
    return json.dumps(v)


def context_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """'key old -> new, ...' over the (dotted) fields that differ, e.g. 'weights.step 40 -> 20'."""
    a, b = _flat(plain_context(old)), _flat(plain_context(new))
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


def canonical_key(subnet: SubnetConfig) -> str:
    """The subnet's canonical JSON (sorted keys, compact): the results-file key."""
    return json.dumps(subnet.to_dict(), sort_keys=True, separators=(",", ":"))


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


def other_context_message(store: ResultStore, contexts: Mapping[str, dict], context: dict | None) -> str:
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


def write_search_config(workdir: str, space: SearchSpace, search: dict, context: dict | None,
                        log: Callable[[str], None]) -> dict:
    """Writes search_config.json (`search`: the SearchConfig as a dict); returns every context recorded so
    far {id: context}, this one included."""
    path = os.path.join(workdir, "search_config.json")
    meta: dict[str, Any] = {"search": search, "space": space.to_dict()}
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
    doc = {"context_id": context_id(context), "context": plain_context(context), "front": list(front)}
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
