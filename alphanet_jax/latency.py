"""Latency tables: per-block timings measured on one device, saved as JSON and checked when loaded.

A table is measured once on the target device and may be loaded on another machine to search there;
loading checks that it belongs to the same search space, batch size and dtype, so a prediction is
never silently made from another setting's timings.
"""

from __future__ import annotations

import json
import math
from typing import Any

from alphanet_jax.errors import UserError
from alphanet_jax.files import atomic_write

TABLE_VERSION = 1
_REQUIRED = ("version", "space_id", "backend", "device_kind", "batch_size", "dtype", "entries", "overhead_ms")


def save_table(path: str, table: dict[str, Any]) -> None:
    """Writes `table` as JSON (crash-safe) after checking its format."""
    _check_format(table, path)
    atomic_write(path, json.dumps(table, indent=1, sort_keys=True))


def load_table(path: str, *, space_id: str, batch_size: int, dtype: str) -> dict[str, Any]:
    """Reads a table and checks it matches the current space, batch size and dtype (errors name both values)."""
    try:
        with open(path) as f:
            table = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"latency table {path} cannot be read: {e}") from e
    _check_format(table, path)
    for key, want in (("space_id", space_id), ("batch_size", batch_size), ("dtype", dtype)):
        if table[key] != want:
            raise UserError(f"latency table {path} was measured with {key}={table[key]!r}, "
                            f"but this run has {key}={want!r}: build a table for this setting (--mode=latency)")
    return table


def predict_from_keys(table: dict[str, Any], keys: list[str]) -> float:
    """Predicted ms: the sum of the table's entries for `keys` (times the fitted `scale`, 1 when absent),
    plus `per_part_ms` (0 when absent) per key, plus the fitted overhead."""
    missing = [k for k in keys if k not in table["entries"]]
    if missing:
        raise UserError(f"latency table has no entry for block shape(s) {missing[:3]}"
                        f"{' ...' if len(missing) > 3 else ''}: rebuild it (--mode=latency)")
    return float(sum(table["entries"][k] for k in keys) * table.get("scale", 1.0)
                 + len(keys) * table.get("per_part_ms", 0.0) + table["overhead_ms"])


def _check_format(table: Any, path: str) -> None:
    if not isinstance(table, dict):
        raise UserError(f"latency table {path} is not a JSON object")
    absent = [k for k in _REQUIRED if k not in table]
    if absent:
        raise UserError(f"latency table {path} lacks field(s) {absent}")
    if table["version"] != TABLE_VERSION:
        raise UserError(f"latency table {path} has version {table['version']!r}, expected {TABLE_VERSION}")
    entries = table["entries"]
    if not isinstance(entries, dict) or not all(
            isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in entries.values()):
        raise UserError(f"latency table {path}: entries must map block keys to finite non-negative ms")
    for key in ("overhead_ms", "per_part_ms"):
        v = table.get(key, 0.0)
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise UserError(f"latency table {path}: {key} must be a finite number")
    scale = table.get("scale", 1.0)
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise UserError(f"latency table {path}: scale must be a finite number > 0, got {scale!r}")
