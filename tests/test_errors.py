"""Every bad input gets one clear error naming the problem (and the fix), before any compilation.

Table-driven: each case builds a bad input and states the exception type and a message pattern.
The README's troubleshooting section lists these messages.
"""

import os
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alphanet_jax import checkpoint, data, mesh, search_space as ss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ss.get_space("tiny")


def _bad_subnet_value():
    d = ss.preset("a0").to_dict()
    d["kernel_size"][2] = 4
    ss.SubnetConfig.from_dict(d, ss.get_space())


def _bad_subnet_length():
    d = ss.preset("a0").to_dict()
    d["depth"] = d["depth"][:-1]
    ss.SubnetConfig.from_dict(d, ss.get_space())


def _batch_not_divisible():
    mesh.check_batch_size(12, mesh.make_mesh(8))


def _missing_dataset_folder(tmp):
    cfg = data.default_config("imagefolder")
    cfg.root = str(tmp / "no-such-imagenet")
    data.dataset_info(cfg)


def _missing_split(tmp):
    (tmp / "ds" / "train" / "cat").mkdir(parents=True)
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp / "ds" / "train" / "cat" / "a.jpg")
    cfg = data.default_config("imagefolder")
    cfg.root = str(tmp / "ds")
    data.dataset_info(cfg)


def _save_small_checkpoint(tmp, space_name="tiny", shape=(3,)):
    ck = checkpoint.Checkpointer(str(tmp / "ckpt"), keep=2, async_save=False)
    state = {"params": {"w": jnp.ones(shape)}, "step": jnp.zeros((), jnp.int32)}
    ck.save(1, state, {"epoch": 0}, {"space": {"name": space_name}})
    ck.close()
    return state


def _restore(tmp, abstract, meta):
    ck = checkpoint.Checkpointer(str(tmp / "ckpt"), keep=2, async_save=False)
    try:
        ck.restore(ck.latest_step(), abstract, meta)
    finally:
        ck.close()


def _abstract(shape=(3,), extra=False):
    a = {"params": {"w": jax.ShapeDtypeStruct(shape, jnp.float32)}, "step": jax.ShapeDtypeStruct((), jnp.int32)}
    if extra:
        a["params"]["b"] = jax.ShapeDtypeStruct((2,), jnp.float32)
    return a


def _checkpoint_other_space(tmp):
    _save_small_checkpoint(tmp, "tiny")
    _restore(tmp, _abstract(), {"space": {"name": "alphanet"}})


def _checkpoint_missing_tensor(tmp):
    _save_small_checkpoint(tmp)
    _restore(tmp, _abstract(extra=True), {"space": {"name": "tiny"}})


def _checkpoint_misshaped_tensor(tmp):
    _save_small_checkpoint(tmp)
    _restore(tmp, _abstract(shape=(4,)), {"space": {"name": "tiny"}})


def _checkpoint_truncated(tmp):
    _save_small_checkpoint(tmp)
    step_dir = tmp / "ckpt" / "1" / "state"
    for root, _, files in os.walk(step_dir):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "r+b") as fh:
                fh.truncate(max(0, os.path.getsize(p) // 3))
    _restore(tmp, _abstract(), {"space": {"name": "tiny"}})


def _checkpoint_non_finite(tmp):
    ck = checkpoint.Checkpointer(str(tmp / "ckpt"), keep=2, async_save=False)
    try:
        ck.save(1, {"w": jnp.array([1.0, jnp.nan])}, {}, {})
    finally:
        ck.close()


def _malicious_pth(tmp):
    pytest.importorskip("torch")
    from alphanet_jax import convert

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp / 'pwned'}",))

    path = tmp / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {}, "args": Evil()}, f)
    try:
        convert.load_pytorch_checkpoint(str(path), TINY)
    finally:
        assert not (tmp / "pwned").exists()


def _truncated_pth(tmp):
    torch = pytest.importorskip("torch")
    from alphanet_jax import convert

    path = tmp / "cut.pth"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    convert.load_pytorch_checkpoint(str(path), TINY)


CASES = [
    ("subnet value outside its choices", _bad_subnet_value, ss.SearchSpaceError,
     r"kernel_size\[2\] = 4 is not allowed .*mb3.*choices \[3, 5\]"),
    ("subnet list of the wrong length", _bad_subnet_length, ss.SearchSpaceError, r"'depth' has 6 entries.*needs 7"),
    ("batch not divisible by the devices", _batch_not_divisible, ValueError,
     r"batch_size = 12 is not divisible by the 8 devices.*multiple of 8"),
    ("missing dataset folder", _missing_dataset_folder, FileNotFoundError, r"no-such-imagenet"),
    ("missing split", _missing_split, FileNotFoundError, r"val"),
    ("checkpoint from another search space", _checkpoint_other_space, checkpoint.CheckpointError,
     r"another search space \('tiny'\) than this run \('alphanet'\)"),
    ("checkpoint with a missing tensor", _checkpoint_missing_tensor, checkpoint.CheckpointError,
     r"does not fit this model: missing \['params/b'\]"),
    ("checkpoint with a mis-shaped tensor", _checkpoint_misshaped_tensor, checkpoint.CheckpointError,
     r"mis-shaped \[\('params/w', \(3,\), \(4,\)\)\]"),
    ("truncated orbax checkpoint", _checkpoint_truncated, checkpoint.CheckpointError,
     r"(incomplete or damaged|could not be read).*delete that step directory"),
    ("non-finite state never saved", _checkpoint_non_finite, checkpoint.CheckpointError, r"non-finite values"),
    ("malicious .pth refused without running it", _malicious_pth, ValueError, r"os.system|posix.system|refus"),
    ("truncated .pth", _truncated_pth, ValueError, r"cut.pth"),
]


@pytest.mark.parametrize("name,make,exc,pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_a_clear_error(tmp_path, name, make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        try:
            make(tmp_path)
        except TypeError as e:  # the zero-argument cases
            if "positional argument" not in str(e):
                raise
            make()


def _launch(*args, timeout=120):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_unknown_config_key_on_the_command_line(tmp_path):
    out = _launch("--config=configs/quickstart.py", f"--workdir={tmp_path}", "--config.sandwhich.distill=kl")
    assert out.returncode == 2
    assert "sandwhich" in out.stderr and 'Did you mean "sandwich"' in out.stderr  # names the key, suggests the fix
    assert "Traceback" not in out.stderr


def test_bad_config_value_on_the_command_line(tmp_path):
    out = _launch("--config=configs/quickstart.py", f"--workdir={tmp_path}", "--config.batch_size=abc")
    assert out.returncode == 2 and "--config.batch_size=abc" in out.stderr and "Traceback" not in out.stderr


def test_missing_checkpoint_for_evaluation(tmp_path):
    out = _launch("--config=configs/quickstart.py", f"--workdir={tmp_path / 'empty'}", "--mode=evaluate")
    assert out.returncode == 2 and "no checkpoint in" in out.stderr and "train first" in out.stderr
    assert "Traceback" not in out.stderr


def test_unknown_task_on_the_command_line(tmp_path):
    out = _launch("--config=configs/quickstart.py", f"--workdir={tmp_path}", "--mode=trian")
    assert out.returncode == 2
    assert "unknown task(s) ['trian']" in out.stderr and "Traceback" not in out.stderr
