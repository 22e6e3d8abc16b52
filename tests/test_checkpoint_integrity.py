"""Checkpoint integrity and resume fallback: a corrupted, truncated or incomplete checkpoint is named in one
line, moved aside (never deleted) and the newest good one is used; later saves of that step work."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alphanet_jax import checkpoint, fingerprint

META = {"space": {"name": "tiny"}}


def _state(step):
    rng = np.random.default_rng(step)  # incompressible values: flipped bytes land in raw tensor data
    return {"params": {"w": jnp.asarray(rng.standard_normal((256, 256)), jnp.float32),
                       "b": jnp.asarray(rng.standard_normal((64,)), jnp.float32)},
            "step": jnp.asarray(step, jnp.int32)}


def _abstract():
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0))


def _save(directory, steps):
    ck = checkpoint.Checkpointer(str(directory), keep=10, async_save=False)
    try:
        for s in steps:
            ck.save(s, _state(s), {"index": s}, META)
    finally:
        ck.close()


def _restore_newest(directory, **kw):
    lines = []
    ck = checkpoint.Checkpointer(str(directory), keep=10, async_save=False)
    try:
        found = ck.restore_newest(_abstract(), META, log=lines.append, **kw)
        return found, lines, ck.all_steps()
    finally:
        ck.close()


def _tensor_files(step_dir):
    d = os.path.join(step_dir, "state")
    return sorted(os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs
                  if os.sep + "d" + os.sep in os.path.join(r, f) + os.sep)


def _flip_bytes(path, n=100):
    raw = bytearray(open(path, "rb").read())
    mid = len(raw) // 2
    for i in range(mid, min(mid + n, len(raw))):
        raw[i] ^= 0xFF
    open(path, "wb").write(bytes(raw))


def _edit_digest(step_dir):
    path = os.path.join(step_dir, "meta", "metadata")
    meta = json.load(open(path))
    key = sorted(meta[checkpoint.DIGESTS_KEY])[0]
    meta[checkpoint.DIGESTS_KEY][key] = "0" * 32
    json.dump(meta, open(path, "w"))


def _damage(kind, step_dir):
    if kind == "flipped tensor bytes":  # the repro: 100 bytes of the tensor data file
        files = _tensor_files(step_dir)
        assert files, os.listdir(step_dir)
        _flip_bytes(max(files, key=os.path.getsize))
    elif kind == "digest mismatch":
        _edit_digest(step_dir)
    elif kind == "truncated tensor file":
        for f in _tensor_files(step_dir):
            with open(f, "r+b") as fh:
                fh.truncate(os.path.getsize(f) // 3)
    elif kind == "missing tensor file":
        for f in _tensor_files(step_dir):
            os.remove(f)
    elif kind == "missing meta":
        os.remove(os.path.join(step_dir, "meta", "metadata"))
    elif kind == "truncated meta":
        path = os.path.join(step_dir, "meta", "metadata")
        raw = open(path, "rb").read()
        open(path, "wb").write(raw[: len(raw) // 2])
    else:
        raise AssertionError(kind)


KINDS = ["flipped tensor bytes", "digest mismatch", "truncated tensor file", "missing tensor file", "missing meta",
         "truncated meta"]


def test_digests_change_with_any_value_dtype_or_shape():
    base = fingerprint.leaf_digests({"a": jnp.zeros((2, 3))})
    assert base == fingerprint.leaf_digests({"a": jnp.zeros((2, 3))})
    for other in (jnp.zeros((2, 3)).at[1, 2].set(1e-30), jnp.zeros((3, 2)), jnp.zeros((2, 3), jnp.int32)):
        assert fingerprint.leaf_digests({"a": other}) != base


def test_a_sound_checkpoint_restores_bit_exactly(tmp_path):
    _save(tmp_path / "ck", [1, 2])
    (step, state, data, meta), lines, steps = _restore_newest(tmp_path / "ck")
    assert (step, data, lines, steps) == (2, {"index": 2}, [], [1, 2])
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(_state(2))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_newest_checkpoint_is_named_moved_aside_and_the_previous_used(tmp_path, kind):
    ck_dir = tmp_path / "ck"
    _save(ck_dir, [1, 2])
    _damage(kind, str(ck_dir / "2"))
    # Restore verifies: the damaged step alone raises the damaged-checkpoint error, naming it.
    ck = checkpoint.Checkpointer(str(ck_dir), keep=10, async_save=False)
    try:
        with pytest.raises(checkpoint.DamagedCheckpointError, match=f"checkpoint {ck_dir}/2 "):
            ck.restore(2, _abstract(), META)
    finally:
        ck.close()
    # Read-only use (evaluation): skipped with one line, left in place.
    (step, state, _, _), lines, steps = _restore_newest(ck_dir, move_aside=False)
    assert step == 1 and steps == [1, 2] and len(lines) == 1 and "\n" not in lines[0]
    assert f"{ck_dir}/2" in lines[0] and len(lines[0]) < 700
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.asarray(_state(1)["params"]["w"]))
    # Training: moved aside (not deleted), and the step can be saved again.
    (step, _, _, _), lines, steps = _restore_newest(ck_dir)
    assert step == 1 and steps == [1] and f"moving it to {ck_dir}-damaged/2" in lines[0]
    assert os.path.isdir(f"{ck_dir}-damaged/2")
    _save(ck_dir, [2])
    (step, _, _, _), lines, _ = _restore_newest(ck_dir)
    assert step == 2 and lines == []


def test_every_checkpoint_damaged_stops_once_with_all_kept_aside(tmp_path):
    ck_dir = tmp_path / "ck"
    _save(ck_dir, [1, 2])
    _damage("missing meta", str(ck_dir / "1"))
    _damage("digest mismatch", str(ck_dir / "2"))
    # Training does not start over silently: one error, the damaged steps moved aside ...
    with pytest.raises(checkpoint.CheckpointError, match=r"none of the 2 checkpoint\(s\) .* verifies"):
        _restore_newest(ck_dir)
    assert sorted(os.listdir(f"{ck_dir}-damaged")) == ["1", "2"]
    # ... so that a rerun starts from scratch (and does not fail the same way forever).
    found, lines, steps = _restore_newest(ck_dir)
    assert found is None and steps == [] and lines == []
    # A second damaged copy of the same step does not overwrite the first one moved aside.
    _save(ck_dir, [1, 2])
    _damage("missing meta", str(ck_dir / "2"))
    _restore_newest(ck_dir)
    assert sorted(os.listdir(f"{ck_dir}-damaged")) == ["1", "2", "2.1"]


def test_errors_that_are_not_damage_propagate_and_move_nothing(tmp_path, monkeypatch):
    ck_dir = tmp_path / "ck"
    _save(ck_dir, [1, 2])
    ck = checkpoint.Checkpointer(str(ck_dir), keep=10, async_save=False)
    try:
        def out_of_memory(*a, **k):
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB")
        monkeypatch.setattr(ck._mngr, "restore", out_of_memory)
        with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
            ck.restore_newest(_abstract(), META)
        monkeypatch.undo()
        # Another dtype than stored: the model does not fit (Orbax would convert, and every digest differ).
        other = dict(_abstract(), step=jax.ShapeDtypeStruct((), jnp.float32))
        with pytest.raises(checkpoint.CheckpointError, match=r"other dtype \[\('step', 'int32', 'float32'\)\]"):
            ck.restore_newest(other, META)
    finally:
        ck.close()
    assert os.listdir(tmp_path) == ["ck"] and _restore_newest(ck_dir)[2] == [1, 2]


def test_a_checkpoint_of_another_space_is_an_error_not_damage(tmp_path):
    _save(tmp_path / "ck", [1])
    ck = checkpoint.Checkpointer(str(tmp_path / "ck"), keep=10, async_save=False)
    try:
        with pytest.raises(checkpoint.CheckpointError, match="another search space") as info:
            ck.restore_newest(_abstract(), {"space": {"name": "alphanet"}})
        assert not isinstance(info.value, checkpoint.DamagedCheckpointError)
    finally:
        ck.close()
    assert os.listdir(tmp_path) == ["ck"]  # nothing moved
