"""The latency predictor fitted to whole subnets, and its validation (`--mode=latency`; the per-part table
and the timers are `latency_measure`).

`fit_predictor` fits how the parts' entries add up to a whole subnet's end-to-end time: an overhead
(measured - sum of parts, median), or a scale and an overhead, or those and a per-part term (least
squares; a whole subnet is one fused program, its parts' separate programs each pay their own launch
and memory traffic), whichever predicts the fitting subnets best left-one-out. `predict_ms(table,
subnet, space)` is sum(entries) * scale + parts * per_part_ms + overhead.

`measure_and_validate` measures other subnets (spread over the space's FLOPs range) end to end and
reports the Spearman rank correlation and the share within +-10 % of the measured time, for the table's
prediction and for MFLOPs (a line fitted on the same fitting subnets) as predictors.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any, Callable, Sequence

import numpy as np

from alphanet_jax import latency
from alphanet_jax.files import save_figure
from alphanet_jax.flops import count_flops
from alphanet_jax.latency_measure import subnet_parts
from alphanet_jax.sampling import sample_subnet
from alphanet_jax.search_space import SearchSpace, SubnetConfig, get_space

TARGETS = {"spearman": 0.95, "within_10pct": 0.90}


def predict_ms(table: dict, subnet: SubnetConfig, space: SearchSpace | None = None) -> float:
    """Predicted latency in ms of `subnet` from `table`."""
    return latency.predict_from_keys(table, [p.key for p in subnet_parts(subnet, get_space(space))])


def make_predictor(table: dict, space: SearchSpace | None = None) -> Callable[[SubnetConfig], float]:
    """`predict_latency(subnet) -> ms` for one table and space."""
    space = get_space(space)
    return lambda subnet: predict_ms(table, subnet, space)


def spread_subnets(space: SearchSpace, n: int, seed: int, pool: int = 20) -> list[SubnetConfig]:
    """`n` distinct random subnets spread evenly over the MFLOPs range of `pool * n` uniform draws."""
    rng = random.Random(seed)
    draws = {}
    for _ in range(max(pool * n, n)):
        s = sample_subnet(space, rng)
        draws.setdefault(json.dumps(s.to_dict(), sort_keys=True), s)
    ranked = sorted(draws.values(), key=lambda s: count_flops(s, space))
    idx = sorted({round(i * (len(ranked) - 1) / max(n - 1, 1)) for i in range(n)})
    return [ranked[i] for i in idx]


def _rel_errors(pred: np.ndarray, meas: np.ndarray) -> np.ndarray:
    return np.abs(pred - meas) / meas


def _fit_offset(s: np.ndarray, n: np.ndarray, m: np.ndarray) -> tuple[float, float, float]:
    return 1.0, 0.0, float(np.median(m - s))


def _fit_scale(s: np.ndarray, n: np.ndarray, m: np.ndarray) -> tuple[float, float, float]:
    (a, b), *_ = np.linalg.lstsq(np.c_[s, np.ones_like(s)], m, rcond=None)
    return float(a), 0.0, float(b)


def _fit_per_part(s: np.ndarray, n: np.ndarray, m: np.ndarray) -> tuple[float, float, float]:
    (a, c, b), *_ = np.linalg.lstsq(np.c_[s, n, np.ones_like(s)], m, rcond=None)
    return float(a), float(c), float(b)


# name -> (fit, the fewest subnets it needs); chosen by leave-one-out error on the fitting subnets
FIT_MODELS = {"sum + overhead": (_fit_offset, 1), "scale * sum + overhead": (_fit_scale, 4),
              "scale * sum + per-part + overhead": (_fit_per_part, 6)}


def fit_predictor(table: dict, sums: Sequence[float], counts: Sequence[int], measured: Sequence[float]) -> dict:
    """Fits how the parts add up, from the sums of their entries, the numbers of parts and the end-to-end
    times of the same subnets: measured ~ scale * sum + per_part_ms * parts + overhead_ms, with scale 1 and
    no per-part term, or scale, or both fitted; the model with the smallest leave-one-out mean relative
    error is kept (a model with more terms only when it predicts subnets it was not fitted on better).
    Returns the table with `scale`, `per_part_ms`, `overhead_ms` and `fit` set."""
    s, n, m = (np.asarray(x, float) for x in (sums, counts, measured))
    errs, params = {}, {}
    for name, (fit, need) in FIT_MODELS.items():
        if len(s) < need:
            continue
        loo = []
        for i in range(len(s)):
            keep = np.arange(len(s)) != i
            a, c, b = fit(s[keep], n[keep], m[keep]) if len(s) > 1 else fit(s, n, m)
            loo.append(abs(a * s[i] + c * n[i] + b - m[i]) / m[i])
        a, c, b = fit(s, n, m)
        if a > 0:  # a model in which more work takes less time is not kept
            errs[name], params[name] = float(np.mean(loo)), (a, c, b)
    best = min(errs, key=errs.get)
    scale, per_part, overhead = params[best]
    return dict(table, scale=scale, per_part_ms=per_part, overhead_ms=overhead,
                fit={"model": best, "subnets": len(s), "leave_one_out_mean_abs_rel_error": errs,
                     "note": "fitted on subnets measured end to end, not the validation subnets"})


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(v):
        v = np.asarray(v, float)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for val in np.unique(v):  # ties: average rank
            sel = v == val
            r[sel] = r[sel].mean()
        return r
    rx, ry = ranks(x), ranks(y)
    if np.std(rx) == 0 or np.std(ry) == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def validation_report(rows: list[dict]) -> dict:
    """Spearman and share within +-10 % of measured, for the table and for the MFLOPs line."""
    meas = np.array([r["measured_ms"] for r in rows])
    out = {"subnets": len(rows)}
    for name, key in (("latency_table", "predicted_ms"), ("mflops", "mflops_predicted_ms")):
        pred = np.array([r[key] for r in rows])
        out[name] = {"spearman": spearman(pred if name == "latency_table" else [r["mflops"] for r in rows], meas),
                     "within_10pct": float(np.mean(_rel_errors(pred, meas) <= 0.10)),
                     "mean_abs_rel_error": float(np.mean(_rel_errors(pred, meas)))}
    return out


def plot_validation(path: str, rows: list[dict], report: dict, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    meas = [r["measured_ms"] for r in rows]
    lt, mf = report["latency_table"], report["mflops"]
    lo, hi = min(meas), max(meas)
    ax.fill_between([lo, hi], [0.9 * lo, 0.9 * hi], [1.1 * lo, 1.1 * hi], color="0.88", label="+-10 %", zorder=0)
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.8, zorder=1)
    ax.scatter(meas, [r["predicted_ms"] for r in rows], s=14, c="tab:blue",
               label=f"latency table (Spearman {lt['spearman']:.3f}, {100 * lt['within_10pct']:.0f} % within 10 %)")
    ax.scatter(meas, [r["mflops_predicted_ms"] for r in rows], s=10, c="tab:orange", marker="x",
               label=f"MFLOPs line (Spearman {mf['spearman']:.3f}, {100 * mf['within_10pct']:.0f} % within 10 %)")
    ax.set_xlabel("measured latency (ms)")
    ax.set_ylabel("predicted latency (ms)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=7)
    save_figure(fig, path)


def measure_and_validate(timer: Any, space: SearchSpace, table: dict, *, fit_subnets: int, validate_subnets: int,
                         seed: int, log: Callable[[str], None] = print) -> tuple[dict, list[dict], dict]:
    """Fits the table's overhead on `fit_subnets` subnets, then validates it on `validate_subnets` others.
    Returns (fitted table, validation rows, report)."""
    fit = spread_subnets(space, fit_subnets, seed=seed + 1)
    val = spread_subnets(space, validate_subnets, seed=seed + 2)
    t0 = time.perf_counter()
    measured = timer.subnets_ms(fit + val)  # all compiled first, then timed in interleaved rounds
    fit_meas, val_meas = measured[:len(fit)], measured[len(fit):]
    raw = dict(table, scale=1.0, per_part_ms=0.0, overhead_ms=0.0)
    table = fit_predictor(table, [predict_ms(raw, s, space) for s in fit],
                          [len(subnet_parts(s, space)) for s in fit], fit_meas)
    flops_line = np.polyfit([count_flops(s, space) for s in fit], fit_meas, 1) if len(fit) >= 2 else (0.0, 0.0)
    log(f"latency: {len(fit) + len(val)} subnets measured end to end ({time.perf_counter() - t0:.0f} s); "
        f"fitted {table['fit']['model']} on {len(fit)} of them: scale {table['scale']:.3f}, per part "
        f"{table['per_part_ms']:.3f} ms, overhead {table['overhead_ms']:.3f} ms")
    rows = []
    for s, ms in zip(val, val_meas):
        mf = count_flops(s, space)
        rows.append({"subnet": s.to_dict(), "mflops": mf, "predicted_ms": predict_ms(table, s, space),
                     "measured_ms": ms, "mflops_predicted_ms": float(np.polyval(flops_line, mf))})
    report = validation_report(rows)
    return table, rows, report


def shortfall(report: dict) -> str:
    """What misses the targets (Spearman >= 0.95, >= 90 % within +-10 %), or ''."""
    lt = report["latency_table"]
    out = []
    if not lt["spearman"] >= TARGETS["spearman"]:
        out.append(f"Spearman {lt['spearman']:.3f} < {TARGETS['spearman']}")
    if not lt["within_10pct"] >= TARGETS["within_10pct"]:
        out.append(f"{100 * lt['within_10pct']:.1f} % within +-10 % < {100 * TARGETS['within_10pct']:.0f} %")
    return "; ".join(out)


def format_report(report: dict) -> str:
    lt, mf = report["latency_table"], report["mflops"]
    return (f"latency validation on {report['subnets']} subnets (measured end to end): latency table Spearman "
            f"{lt['spearman']:.3f}, {100 * lt['within_10pct']:.1f} % within +-10 % (mean |error| "
            f"{100 * lt['mean_abs_rel_error']:.1f} %); MFLOPs Spearman {mf['spearman']:.3f}, "
            f"{100 * mf['within_10pct']:.1f} % within +-10 % (mean |error| {100 * mf['mean_abs_rel_error']:.1f} %)")
