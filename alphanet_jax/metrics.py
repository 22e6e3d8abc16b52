"""Training metrics: TensorBoard event files and a JSON-lines copy (process 0), and the progress line."""

from __future__ import annotations

import json
import logging
import os
from typing import Mapping

from alphanet_jax.files import atomic_write


class MetricWriter:
    """TensorBoard event files (process 0 only) plus a JSON-lines copy for scripts."""

    def __init__(self, workdir: str, enabled: bool, resume_step: int = 0):
        """`resume_step`: the step the run (re)starts from. Rows of later steps, written before a
        crash and lost with it, are dropped from metrics.jsonl and purged from TensorBoard, so each
        step appears once."""
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, "metrics.jsonl")
            _drop_rows_after(path, resume_step)
            tb_dir = os.path.join(workdir, "tensorboard")
            try:
                from tensorboardX import SummaryWriter
                # TensorBoard hides the events of steps >= purge_step from earlier event files.
                purge = resume_step + 1 if os.path.isdir(tb_dir) and os.listdir(tb_dir) else None
                self._tb = SummaryWriter(tb_dir, purge_step=purge)
            except ImportError:  # pragma: no cover
                logging.warning("tensorboardX is not installed: writing metrics.jsonl only")
            self._jsonl = open(path, "a")

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        self._jsonl.write(json.dumps({"step": step, **{k: float(v) for k, v in scalars.items()}}) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()


def _drop_rows_after(path: str, step: int) -> None:
    """Rewrites the JSON-lines file `path` without its rows of steps after `step` (atomically); the
    dropped lines are appended to `path`.dropped, never lost."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.read().splitlines()
    keep, dropped = [], []
    for line in lines:
        try:
            row_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):  # a line cut by a crash
            row_step = None
        (keep if row_step is not None and row_step <= step else dropped).append(line)
    if not dropped:
        return
    logging.warning("%s: dropping %d rows after step %d (steps lost when the run stopped; kept in %s.dropped)",
                    path, len(dropped), step, path)
    with open(path + ".dropped", "a") as f:
        f.write("".join(line + "\n" for line in dropped))
    atomic_write(path, "".join(line + "\n" for line in keep))


def fmt_progress(step: int, total: int, s: Mapping[str, float]) -> str:
    parts = [f"step {step}/{total}", f"lr {s['lr']:.4g}"]
    for role in ("max", "random1", "random2", "min"):
        if f"{role}/loss" in s:
            parts.append(f"{role} {s[role + '/loss']:.3f}/{100 * s[role + '/acc']:.0f}%")
    parts += [f"|g| {s['grad_norm']:.3g}", f"clip {100 * s['clip_fraction']:.1f}%",
              f"{s['images_per_sec']:.0f} img/s", f"{1000 * s['step_time']:.0f} ms"]
    return " | ".join(parts)
