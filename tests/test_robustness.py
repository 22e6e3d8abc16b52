"""Crash-safe training: SIGKILL at random moments, SIGTERM, and non-finite steps (issue: crash safety)."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from alphanet_jax import checkpoint, train
import xla_env

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers"))
import train_worker  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "workers", "train_worker.py")
STEPS = 16
SandwichStep = train.SandwichStep  # the production step, which fault injection wraps


def _env(cache_dir):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, JAX_DISABLE_MOST_OPTIMIZATIONS="1",
               JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", XLA_FLAGS=xla_env.xla_flags(1))
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
    # SIGKILL at random moments (steps, checkpoint writes, start-up): 6 times, or until the run gets through.
    for trial in range(30):
        if kills == 6:
            break
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


def _nan_gradients_at(monkeypatch, steps):
    """Fault injection from outside the production programs: the training step, wrapped, is fed
    NaN images at `steps` (0-based), so that every gradient of those steps is NaN."""

    class FaultyStep(SandwichStep):
        def __call__(self, state, batch, encs, rng):
            if int(jax.device_get(state["step"])) in steps:
                batch = dict(batch, image=batch["image"] * np.float32(np.nan))
            return super().__call__(state, batch, encs, rng)

    monkeypatch.setattr(train, "SandwichStep", FaultyStep)


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tmp_path, monkeypatch):
    c = train_worker.config(4)
    _nan_gradients_at(monkeypatch, {1})
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

    # The skipped step still advances the schedule: optax's step count equals state.step, so the
    # update of step t used lr(t), the value logged for it.
    counts = [x for p, x in jax.tree_util.tree_flatten_with_path(out["state"]["opt_state"])[0]
              if getattr(p[-1], "name", None) == "count"]
    assert counts and [int(x) for x in counts] == [int(out["state"]["step"])] * len(counts) == [4] * len(counts)

    # Three bad steps in a row stop the run on the device at once: with no log or save step in
    # between, nothing after step 5 is applied, and the host reports it at the final log step.
    c = train_worker.config(8)
    _nan_gradients_at(monkeypatch, {2, 3, 4})
    c.max_consecutive_bad_steps = 3
    c.log_every_steps = c.checkpoint.every_steps = 100
    with pytest.raises(train.TrainingError, match=r"3 consecutive steps had non-finite gradients \(the run "
                                                  r"stopped at step 5\)"):
        train.train_and_evaluate(c, str(tmp_path / "three"))
    assert not os.path.exists(tmp_path / "three" / "checkpoints" / "8")


def test_sigterm_stops_a_single_process_after_the_current_step_whatever_stop_check_every(tmp_path, monkeypatch):
    # One process reads its own flag after every step (no exchange, no wait): stop_check_every, which
    # spaces the exchanges of a multi-host run (tests/test_multihost.py), does not delay its stop.
    c = train_worker.config(8)
    c.stop_check_every = c.log_every_steps = c.checkpoint.every_steps = 100
    real_subnets = train.sandwich_subnets

    def subnets(space, seed, step, n):
        if step == 1:
            signal.raise_signal(signal.SIGTERM)  # during step 2 of 8, a step without log, save or exchange
        return real_subnets(space, seed, step, n)

    monkeypatch.setattr(train, "sandwich_subnets", subnets)
    out = train.train_and_evaluate(c, str(tmp_path / "w"))
    assert out["interrupted"] is True and out["steps"] == 2
    assert _checkpoint_steps(tmp_path / "w") == [2]


def _event_records(directory):
    """(step, session-log status, scalar tags) of every event in the TensorBoard files of `directory`."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        raw = path.read_bytes()
        i = 0
        while i < len(raw):
            n = int.from_bytes(raw[i:i + 8], "little")
            e = event_pb2.Event.FromString(raw[i + 12:i + 12 + n])
            out.append((path.name, e.step, e.session_log.status, [v.tag for v in e.summary.value]))
            i += 12 + n + 4
    return out


def test_resume_past_a_damaged_checkpoint_goes_on_and_logs_every_step_once(tmp_path):
    c = train_worker.config(6)
    c.checkpoint.every_steps, c.checkpoint.keep = 2, 5
    work = tmp_path / "w"
    train.train_and_evaluate(c, str(work))
    os.remove(work / "checkpoints" / "6" / "meta" / "metadata")  # the repro
    # The rerun resumes from step 4, saves step 6 again and finishes (it used to stop at every rerun with
    # "Checkpoint for step 6 already exists"); the damaged step is kept aside.
    c.total_steps = 8
    out = train.train_and_evaluate(c, str(work))
    assert out["steps"] == 8 and not out["interrupted"]
    assert _checkpoint_steps(work) == [2, 4, 6, 8]
    assert os.listdir(work / "checkpoints-damaged") == ["6"]
    # Rows of the lost steps 5 and 6 were dropped on resume: every step appears once.
    with open(work / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == list(range(1, 9))
    with open(work / "metrics.jsonl.dropped") as f:  # the dropped rows are kept aside
        assert [json.loads(line)["step"] for line in f] == [5, 6]
    # TensorBoard: the new event file starts by purging steps >= 5 from the earlier one.
    records = _event_records(work / "tensorboard")
    files = sorted({r[0] for r in records})
    assert len(files) == 2
    second = [r for r in records if r[0] == files[1]]
    from tensorboardX.proto import event_pb2
    assert [r[1] for r in second if r[2] == event_pb2.SessionLog.START] == [5], second[:3]
    assert sorted({r[1] for r in second if r[3]}) == [5, 6, 7, 8]
