"""The evolutionary search's Pareto buckets and front (spec §9). Pure Python.

bucket = round(cost / step) * step (Python round, as the reference), cost being MFLOPs or predicted
latency (`SearchConfig.cost_key`); each bucket keeps the row with the highest top-1 (a later row replaces
it only when strictly better). The front is the bucket winners sorted by bucket, each marked whether any
other row dominates it.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["bucket_of", "pareto_buckets", "non_dominated", "front_rows"]


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


def front_rows(buckets: Mapping[float, dict], key: str = "mflops") -> list[dict]:
    """The front: one row per bucket, sorted, with `bucket` and `non_dominated` added and the row's
    `key` and `seconds` left out (the timings, so that the front is a function of the search alone)."""
    rows = []
    for b in sorted(buckets):
        r = {k: v for k, v in buckets[b].items() if k not in ("key", "seconds")}
        r["bucket"] = b
        rows.append(r)
    for r, nd in zip(rows, non_dominated(rows, key)):
        r["non_dominated"] = nd
    return rows
