"""Crash-safe training: SIGKILL at random moments, SIGTERM, and non-finite steps (issue: crash safety)."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from alphanet_jax import checkpoint, train

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers"))
import train_worker  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "workers", "train_worker.py")
STEPS = 16


def _env(cache_dir):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, JAX_DISABLE_MOST_OPTIMIZATIONS="1",
               JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env.pop("XLA_FLAGS", None)
    return env


def _start(workdir, cache_dir):
    return subprocess.Popen([sys.executable, WORKER, str(workdir), str(STEPS)], cwd=ROOT, env=_env(cache_dir),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _params(workdir):
    with np.load(os.path.join(workdir, "final_params.npz")) as z:
        return {k: z[k] for k in z.files}


def _checkpoint_steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(x) for x in os.listdir(d) if x.isdigit()) if os.path.isdir(d) else []


@pytest.mark.slow
def test_sigkill_and_sigterm_resume_to_the_uninterrupted_result(tmp_path):
    cache = tmp_path / "jax-cache"
    p = _start(tmp_path / "straight", cache)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    straight = _params(tmp_path / "straight")

    work = tmp_path / "killed"
    rng = random.Random(1)
    kills = 0
    # SIGTERM first: it saves and exits with status 0.
    p = _start(work, cache)
    deadline = time.time() + 240
    while not _checkpoint_steps(work) and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0 and "interrupted" in out, err[-3000:]
    after_term = _checkpoint_steps(work)
    assert after_term and after_term[-1] < STEPS
    # SIGKILL at random moments (steps, checkpoint writes, start-up), until the run gets through.
    for trial in range(30):
        p = _start(work, cache)
        deadline = time.time() + 240
        start_steps = _checkpoint_steps(work)
        while _checkpoint_steps(work) == start_steps and p.poll() is None and time.time() < deadline:
            time.sleep(0.05)  # wait until this run has made progress ...
        time.sleep(rng.uniform(0.0, 0.4))  # ... then kill it somewhere in the next step or save
        if p.poll() is not None:
            p.communicate()
            break
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
        kills += 1
        # The newest checkpoint, the one a restart uses, is always complete (Orbax renames a step's
        # directory only once it is fully written; an older step may be half-deleted by the
        # keep-newest-N clean-up when the kill lands there, and is never used).
        steps = _checkpoint_steps(work)
        if steps:
            newest = os.path.join(work, "checkpoints", str(steps[-1]))
            assert all(os.path.exists(os.path.join(newest, item)) for item in ("state", "data", "meta")), newest
    assert kills >= 5, kills
    if not os.path.exists(os.path.join(work, "final_params.npz")):
        p = _start(work, cache)
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    resumed = _params(work)
    assert resumed.keys() == straight.keys()
    for k in straight:
        np.testing.assert_array_equal(resumed[k], straight[k], err_msg=k)


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tmp_path):
    c = train_worker.config(4)
    c.debug_nan_steps = (1,)
    out = train.train_and_evaluate(c, str(tmp_path / "one"))
    assert int(out["state"]["skipped"]) == 1 and out["steps"] == 4
    with open(tmp_path / "one" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["finite"] for r in rows] == [1.0, 0.0, 1.0, 1.0]
    assert rows[-1]["skipped"] == 1
    # Every checkpoint holds only finite values.
    ck = checkpoint.Checkpointer(str(tmp_path / "one" / "checkpoints"), async_save=False)
    try:
        model = train.make_model(c, train.get_space(c.space))
        tx = train.make_optimizer(c, lambda t: 0.0)
        from alphanet_jax import mesh
        for step in ck.all_steps():
            state, _, _ = ck.restore(step, train.abstract_state(model, tx, mesh.make_mesh(-1)))
            assert checkpoint.nonfinite_leaves(state) == []
    finally:
        ck.close()

    c = train_worker.config(6)
    c.debug_nan_steps = (2, 3, 4)
    c.max_consecutive_bad_steps = 3
    with pytest.raises(train.TrainingError, match="3 consecutive steps had non-finite gradients"):
        train.train_and_evaluate(c, str(tmp_path / "three"))
