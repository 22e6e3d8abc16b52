"""Checks of a run's config and workdir, made before any work (nothing is loaded or compiled yet, and
jax is not started: multi-host start-up comes after).

Each bad value is a `ConfigError` naming the key, the value and what it must be; a workdir that
is a file, lies under a file or cannot be written is a `WorkdirError`.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any, Callable, Iterable

from alphanet_jax import data as data_lib
from alphanet_jax import latency_measure
from alphanet_jax import depthwise as depthwise_lib
from alphanet_jax import sandwich
from alphanet_jax import supernet
from alphanet_jax import train
from alphanet_jax.errors import ConfigError, WorkdirError
from alphanet_jax.search_config import SearchConfig
from alphanet_jax.search_space import get_space

_MISSING = object()

# (key, the values it may take, requirement): checked when the config has the key.
_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    *((k, lambda v: _is_int(v) and v >= 1, "an integer >= 1") for k in (
        "batch_size", "log_every_steps", "checkpoint.every_steps", "checkpoint.keep", "max_consecutive_bad_steps",
        "stop_check_every", "optim.lr_batch_unit", "eval.batch_size", "eval.calib_batch_size", "eval.calib_batches",
        "search.calib_batches")),
    *((k, lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: off)") for k in ("eval.every_steps",
                                                                                   "data_prefetch")),
    ("sandwich.num_arch_training", lambda v: _is_int(v) and v >= 2, "an integer >= 2 (the max and min subnets)"),
    *((k, lambda v: _is_num(v) and v > 0, "a number > 0") for k in ("optim.base_lr", "optim.grad_clip_value",
                                                                    "sandwich.iw_clip")),
    ("optim.weight_decay", lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    ("optim.momentum", lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("optim.warmup_start_factor", lambda v: _is_num(v) and 0 <= v <= 1, "a number in [0, 1]"),
    *((k, lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)") for k in (
        "sandwich.label_smoothing", "sandwich.dropout", "sandwich.drop_connect")),
    *((k, lambda v: _is_num(v), "a finite number") for k in ("sandwich.alpha_min", "sandwich.alpha_max")),
    ("model.bn_eps", lambda v: _is_num(v) and v > 0, "a number > 0"),
    ("model.dtype", lambda v: v in train.DTYPES, f"one of {train.DTYPES}"),
    ("model.depthwise_impl", lambda v: v in depthwise_lib.DEPTHWISE_IMPLS, f"one of {depthwise_lib.DEPTHWISE_IMPLS}"),
    ("sandwich.distill", lambda v: v in sandwich.DISTILL_LOSSES, f"one of {sandwich.DISTILL_LOSSES}"),
    ("model.scan_blocks", lambda v: isinstance(v, bool) or str(v).lower() in supernet.SCAN_BLOCKS_VALUES,
     "True, False or 'auto'"),
    ("model.skip_inactive_blocks",
     lambda v: isinstance(v, bool) or str(v).lower() in supernet.SKIP_INACTIVE_VALUES, "True, False or 'auto'"),
    ("model.block_residuals", lambda v: str(v).lower() in supernet.BLOCK_RESIDUALS_VALUES,
     f"one of {supernet.BLOCK_RESIDUALS_VALUES}"),
    ("compile_cache", lambda v: isinstance(v, str), "'auto', 'none' or a directory"),
    ("mesh.data", lambda v: _is_int(v) and (v >= 1 or v in (-1, 0)), "-1 (all devices) or a device count >= 1"),
    *((k, lambda v: _is_int(v) and v >= 1, "an integer >= 1") for k in ("latency.batch_size", "latency.repeats",
                                                                         "latency.rounds")),
    ("latency.warmup", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    *((k, lambda v: _is_int(v) and v >= 2, "an integer >= 2") for k in ("latency.fit_subnets",
                                                                          "latency.validate_subnets")),
    ("latency.runtime", lambda v: v in latency_measure.RUNTIMES, f"one of {latency_measure.RUNTIMES}"),
    ("latency.statistic", lambda v: v in latency_measure.STATISTICS, f"one of {tuple(latency_measure.STATISTICS)}"),
    ("export.max_latency_ms", lambda v: _is_num(v) and v >= 0, "a number >= 0 (0: off)"),
)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _get(config: Any, key: str) -> Any:
    for part in key.split("."):
        try:
            config = config[part]
        except (KeyError, TypeError, AttributeError):
            return _MISSING
    return config


def _checked(key: str, fn: Callable[[], Any]) -> None:
    """Runs a module's own validation of a config section; its ValueError becomes a ConfigError."""
    try:
        fn()
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from e


def validate_config(config: Any, tasks: Iterable[str] = ("train",)) -> None:
    """Raises ConfigError for the first value that cannot work for `tasks` (before any work)."""
    tasks = set(tasks)
    for key, ok, need in _RULES:
        v = _get(config, key)
        if v is not _MISSING and not ok(v):
            raise ConfigError(f"{key} = {v!r} is not allowed: it must be {need} (--config.{key}=...)")
    a, b = _get(config, "sandwich.alpha_min"), _get(config, "sandwich.alpha_max")
    if _MISSING not in (a, b) and a > b:
        raise ConfigError(f"sandwich.alpha_min = {a} is larger than sandwich.alpha_max = {b}")
    if "train" in tasks and _get(config, "model.bn_group_size") is not _MISSING:
        # The device count is known once jax starts; with mesh.data given, the per-device batch is known now.
        n = _get(config, "mesh.data")
        train.check_bn_group_size(config, n if _is_int(n) and n >= 1 and _is_int(config.batch_size) else None)
    if _get(config, "data") is not _MISSING:
        _checked("data", lambda: data_lib.resolve_config(config.data))
    if _get(config, "space") is not _MISSING and get_space(config.space).in_channels != 3:
        raise ConfigError(f"space.in_channels = {get_space(config.space).in_channels}, but the data pipelines "
                          f"give RGB images: set it to 3")
    if "train" in tasks and _get(config, "total_steps") is not _MISSING:
        if config.total_steps <= 0 and config.num_epochs <= 0:
            raise ConfigError(f"training would run 0 steps (total_steps = {config.total_steps}, num_epochs = "
                              f"{config.num_epochs}): set --config.total_steps or --config.num_epochs")
    if "search" in tasks and _get(config, "search") is not _MISSING:
        section = {k: v for k, v in config.search.items() if k != "calib_batches"}
        _checked("search", lambda: SearchConfig.from_any(section))


def check_workdir(workdir: str) -> None:
    """Creates `workdir` (with its parents) and checks that files can be written there."""
    path = os.path.abspath(workdir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise WorkdirError(f"--workdir {workdir} is a file, not a directory: give a directory (it is created "
                           f"when missing)")
    above = os.path.dirname(path)
    while not os.path.exists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise WorkdirError(f"--workdir {workdir} lies under {above}, which is a file, not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        # A unique name: hosts of a multi-host run may share the workdir and have the same PID.
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise WorkdirError(f"--workdir {workdir} is not writable ({e.strerror or e}): every task writes its "
                           f"results there; give a writable directory (the weights may come from another one "
                           f"with --config.eval.checkpoint=DIR)") from e
