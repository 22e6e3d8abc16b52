"""Every bad input gets one clear error naming the problem (and the fix), before any compilation.

Table-driven: each case builds a bad input and states the exception type and a message pattern.
The README's troubleshooting section lists these messages.
"""

import errno
import logging
import json
import os
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from alphanet_jax import checkpoint, data, errors, mesh, presets, search_space as ss, tasks
import xla_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ss.get_space("tiny")


def _bad_subnet_value():
    d = presets.preset("a0").to_dict()
    d["kernel_size"][2] = 4
    ss.SubnetConfig.from_dict(d, ss.get_space())


def _bad_subnet_length():
    d = presets.preset("a0").to_dict()
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


def _subnet_with_unknown_key(tmp):
    d = presets.preset("a0").to_dict()
    d["width_multiplier"] = 1.0  # a misspelt width_mult
    ss.SubnetConfig.from_dict(d, ss.get_space())


def _subnet_file_that_is_a_directory(tmp):
    presets.as_subnet(str(tmp), TINY)


def _binary_subnet_file(tmp):
    (tmp / "net.json").write_bytes(bytes(range(256)))
    presets.as_subnet(str(tmp / "net.json"), TINY)


def _subnet_file_with_a_bad_value(tmp):
    d = TINY.min_subnet().to_dict()
    d["kernel_size"] = [9] * len(d["kernel_size"])
    (tmp / "net.json").write_text(json.dumps(d))
    presets.as_subnet(str(tmp / "net.json"), TINY)


def _write_junk_images(root, splits=("train", "val")):
    for split in splits:
        os.makedirs(root / split / "a", exist_ok=True)
        for i in range(4):
            (root / split / "a" / f"{i}.jpg").write_bytes(b"not an image")


def _every_training_image_undecodable(tmp):
    _write_junk_images(tmp / "ds")
    cfg = data.default_config("imagefolder")
    cfg.root, cfg.num_workers = str(tmp / "ds"), 0
    next(data.make_train_iterator(cfg, batch_size=2, seed=0))


CASES = [
    ("binary subnet file", _binary_subnet_file, errors.SearchSpaceError, r"net\.json' is not valid JSON"),
    ("subnet file with a bad value", _subnet_file_with_a_bad_value, errors.SearchSpaceError,
     r"subnet file '.*net\.json': .*kernel_size\[0\] = 9 is not allowed"),
    ("subnet value outside its choices", _bad_subnet_value, errors.SearchSpaceError,
     r"kernel_size\[2\] = 4 is not allowed .*mb3.*choices \[3, 5\]"),
    ("subnet list of the wrong length", _bad_subnet_length, errors.SearchSpaceError, r"'depth' has 6 entries.*needs 7"),
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
    ("subnet JSON with an unknown key", _subnet_with_unknown_key, errors.SearchSpaceError,
     r"unknown subnet keys \['width_multiplier'\]; a subnet has \['resolution'"),
    ("subnet file that is a directory", _subnet_file_that_is_a_directory, errors.SearchSpaceError, r"is a directory"),
    ("every training image undecodable", _every_training_image_undecodable, errors.DataError,
     r"\(4 records\) could be decoded as an image"),
]


@pytest.mark.parametrize("name,make,exc,pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_a_clear_error(tmp_path, name, make, exc, pattern):
    with pytest.raises(exc, match=pattern) as info:
        try:
            make(tmp_path)
        except TypeError as e:  # the zero-argument cases
            if "positional argument" not in str(e):
                raise
            make()
    assert isinstance(info.value, errors.UserError)  # launch.py prints it as one line


def _launch(*args, timeout=120):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_env.xla_flags(1))
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


# ----------------------------------------------------------------------------
# tasks.run: config values and the workdir are checked before any task starts
# ----------------------------------------------------------------------------


def _quickstart(overrides=None):
    from configs import quickstart

    config = quickstart.get_config()
    config.update_from_flattened_dict(overrides or {})
    return config


@pytest.fixture
def tasks_must_not_run(monkeypatch):
    """A task that starts fails the test: the bad input must be refused before any work."""
    def never(*args, **kwargs):
        raise AssertionError("a task started (loading, compiling) before the bad input was refused")

    for name in tasks.TASKS:
        monkeypatch.setitem(tasks.TASKS, name, never)
    monkeypatch.setattr(tasks.train_lib, "train_and_evaluate", never)


RUN_CASES = [
    ("checkpoint.every_steps = 0", {"checkpoint.every_steps": 0}, errors.ConfigError,
     r"checkpoint.every_steps = 0 is not allowed: it must be an integer >= 1"),
    ("log_every_steps = 0", {"log_every_steps": 0}, errors.ConfigError, r"log_every_steps = 0 is not allowed"),
    ("a schedule of zero steps", {"total_steps": 0, "num_epochs": 0}, errors.ConfigError,
     r"training would run 0 steps \(total_steps = 0, num_epochs = 0\)"),
    ("negative eval.every_steps", {"eval.every_steps": -5}, errors.ConfigError, r"eval.every_steps = -5"),
    ("an unknown distillation", {"sandwich.distill": "kld"}, errors.ConfigError, r"sandwich.distill = 'kld'"),
    ("an empty search window", {"search.flops_min": 5.0, "search.flops_max": 1.0}, errors.ConfigError,
     r"search: empty FLOPs window"),
    ("an unknown depth-skipping choice", {"model.skip_inactive_blocks": "sometimes"}, errors.ConfigError,
     r"model.skip_inactive_blocks = 'sometimes'"),
    ("a BN epsilon of zero", {"model.bn_eps": 0.0}, errors.ConfigError, r"model.bn_eps = 0.0 is not allowed"),
    ("a compilation cache that cannot be made", {"compile_cache": "/dev/null/xla"}, errors.ConfigError,
     r"compile_cache: cannot use '/dev/null/xla' as the compilation cache"),
]


@pytest.mark.parametrize("name,overrides,exc,pattern", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_bad_config_value_refused_before_any_task(tmp_path, tasks_must_not_run, name, overrides, exc, pattern):
    with pytest.raises(exc, match=pattern):
        tasks.run(_quickstart(overrides), str(tmp_path / "w"))


def test_workdir_that_is_a_file_or_under_a_file(tmp_path, tasks_must_not_run):
    (tmp_path / "f").write_text("x")
    with pytest.raises(errors.WorkdirError, match=r"--workdir .*/f is a file, not a directory"):
        tasks.run(_quickstart(), str(tmp_path / "f"))
    with pytest.raises(errors.WorkdirError, match=r"--workdir .*/f/sub/deeper lies under .*/f, which is a file"):
        tasks.run(_quickstart(), str(tmp_path / "f" / "sub" / "deeper"))


def test_read_only_workdir_refused_before_evaluating(tmp_path, monkeypatch, tasks_must_not_run):
    from alphanet_jax import config_check

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: make the write test fail as it would for a user
        def refuse(path, *args, **kwargs):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)

        monkeypatch.setattr(config_check.tempfile, "mkstemp", lambda dir, **kw: refuse(dir))
    try:
        with pytest.raises(errors.WorkdirError, match=r"--workdir .*/ro is not writable \(Permission denied\)"):
            tasks.run(_quickstart(), str(ro), "evaluate")
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    # What Orbax passes on from TensorStore when the disk fills during a checkpoint save.
    ValueError("RESOURCE_EXHAUSTED: Error writing local file \"ckpt/_sharding\": Failed to write 47308 bytes to "
               "file 15: No space left on device [os_error_code='28']"),
], ids=["OSError", "TensorStore"])
def test_full_disk_is_one_error_naming_the_workdir(tmp_path, monkeypatch, failure):
    def train_on_a_full_disk(config, workdir):
        raise failure

    monkeypatch.setattr(tasks.train_lib, "train_and_evaluate", train_on_a_full_disk)
    with pytest.raises(errors.WorkdirError, match=r"No space left on device while writing to --workdir .*/w: "
                                                  r"free some space"):
        tasks.run(_quickstart(), str(tmp_path / "w"), "train")


def test_undecodable_validation_image_is_said_to_be_masked_out(tmp_path, caplog):
    from PIL import Image

    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / split / "a" / "good.png")
    (tmp_path / "val" / "a" / "junk.jpg").write_bytes(b"not an image")
    cfg = data.default_config("imagefolder")
    cfg.root, cfg.num_workers = str(tmp_path), 0
    with caplog.at_level(logging.WARNING, logger="alphanet_jax.data"):
        list(data.make_eval_iterator(cfg, batch_size=2))
    (msg,) = [r.getMessage() for r in caplog.records if "junk.jpg" in r.getMessage()]
    assert "masked out" in msg and "replaced" not in msg


# ----------------------------------------------------------------------------
# launch.py: one line for the package's errors, a traceback for bugs
# ----------------------------------------------------------------------------


def test_config_file_that_cannot_be_loaded(tmp_path):
    missing = "No such file or directory: 'configs/nope.py'"
    for args, expected in [(["--config=configs/nope.py"], missing),
                           (["--config=configs/nope.py", "--config.batch_size=4"], missing),
                           (["--config=configs/quickstart.py:stpes=5"], "unknown config argument 'stpes'")]:
        out = _launch(*args, f"--workdir={tmp_path}")
        assert out.returncode == 2 and expected in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1
        if expected == missing:
            assert "configs/quickstart.py" in out.stderr  # the configs there are


def test_rejected_batch_size_leaves_no_orbax_traceback(tmp_path):
    out = _launch("--config=configs/quickstart.py", f"--workdir={tmp_path}", "--mode=train", "--config.batch_size=4096")
    assert out.returncode == 2 and "fewer than one batch of 4096" in out.stderr
    assert "Traceback" not in out.stderr and "cannot schedule new futures" not in out.stderr, out.stderr


# launch.py with one function replaced: a save on a full disk (a real Orbax save, whose writes fail in
# its background threads), or an internal bug.
_PATCHED_LAUNCH = r'''
import errno, os, runpy, sys
from alphanet_jax import tasks, train


def save_on_a_full_disk(config, workdir):
    import jax.numpy as jnp
    from etils.epath import abstract_path
    from alphanet_jax import checkpoint

    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    ck = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=True)
    abstract_path.Path.write_text = no_space
    try:
        ck.save(1, {"w": jnp.ones(3)}, {}, {})
        ck.wait()
    finally:
        ck.close()


def internal_bug(*args, **kwargs):
    raise ValueError("an internal bug")


if sys.argv.pop(1) == "full_disk":
    train.train_and_evaluate = save_on_a_full_disk
else:
    tasks.run = internal_bug
sys.argv[0] = "launch.py"
runpy.run_path("launch.py", run_name="__main__")
'''


def _patched_launch(what, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XLA_FLAGS=xla_env.xla_flags(1))
    return subprocess.run([sys.executable, "-c", _PATCHED_LAUNCH, what, "--config=configs/quickstart.py", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_full_disk_during_a_save_is_one_line(tmp_path):
    out = _patched_launch("full_disk", f"--workdir={tmp_path}", "--mode=train")
    assert out.returncode == 2, out.stderr
    assert f"No space left on device while writing to --workdir {tmp_path}: free some space" in out.stderr
    assert "Traceback" not in out.stderr, out.stderr


def test_internal_errors_keep_their_traceback(tmp_path):
    out = _patched_launch("bug", f"--workdir={tmp_path}")
    assert out.returncode == 1 and "Traceback" in out.stderr and "ValueError: an internal bug" in out.stderr
    assert "alphanet-jax: error" not in out.stderr
