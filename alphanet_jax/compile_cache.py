"""The persistent XLA compilation cache: a run that compiles what an earlier run compiled loads it instead.

The AlphaNet step compiles for 104-114 s on a 2-core CPU (`len(resolutions) + 2` programs); a resumed,
repeated or re-evaluated run with the same programs (same config, shapes, devices, jax and jaxlib)
loads them from disk in about a second each (benchmarks/RESULTS.md). jax keys each entry on the
program and everything that changes its compilation, so a stale entry is never used.

`config.compile_cache`: 'auto' (the directory in $JAX_COMPILATION_CACHE_DIR if set, else
$XDG_CACHE_HOME/alphanet_jax/xla, by default ~/.cache/alphanet_jax/xla), 'none' (off), or a
directory. Only jax's process 0 writes entries (jax's rule): on several hosts give a directory
that all of them share. The cache is trusted code: do not point it at a directory others can write.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Mapping

import jax

from alphanet_jax.errors import ConfigError

OFF = ("none", "off", "false", "")
HIT_EVENT = "/jax/compilation_cache/cache_hits"  # jax monitoring: a compile served from the cache


def resolve(value: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The cache directory `value` names ('auto', 'none' or a path; see the module doc), or None for off."""
    if not isinstance(value, str):
        raise ConfigError(f"compile_cache must be 'auto', 'none' or a directory, got {value!r}")
    env = os.environ if environ is None else environ
    v = value.strip()
    if v.lower() in OFF:
        return None
    if v.lower() == "auto":
        if env.get("JAX_COMPILATION_CACHE_DIR"):
            return env["JAX_COMPILATION_CACHE_DIR"]
        base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return os.path.join(base, "alphanet_jax", "xla")
    return v if "://" in v else os.path.abspath(os.path.expanduser(v))


def enable(value: str) -> str | None:
    """Turns the cache on in `value`'s directory (made if missing), or off; returns the directory or None.

    An explicit directory that cannot be made or written is a ConfigError; with 'auto' that only turns
    the cache off (returns None). Call before the first compile of the process; later calls that
    change the directory take effect for the compiles after them.
    """
    path = resolve(value)
    if path is not None and "://" not in path:
        try:
            os.makedirs(path, exist_ok=True)
            writable = os.access(path, os.W_OK | os.X_OK)
        except OSError as e:
            writable, reason = False, e.strerror or str(e)
        else:
            reason = "not writable"
        if not writable:
            if value.strip().lower() == "auto":
                path = None
            else:
                raise ConfigError(f"compile_cache: cannot use {path!r} as the compilation cache ({reason}); "
                                  f"give a writable directory or 'none'")
    if path == _current() and (path is None) == (not jax.config.jax_enable_compilation_cache):
        return path  # as it is already (e.g. a second run in the same process)
    from jax.experimental.compilation_cache import compilation_cache

    compilation_cache.reset_cache()  # jax fixes its cache at the first compile: re-read the settings
    jax.config.update("jax_enable_compilation_cache", path is not None)
    jax.config.update("jax_compilation_cache_dir", path)
    return path


def _current() -> str | None:
    return jax.config.jax_compilation_cache_dir or None


@contextlib.contextmanager
def count_hits() -> Iterator[dict[str, int]]:
    """{'hits': n}: the compiles inside the block that the cache served (for the compile log line)."""
    counter = {"hits": 0}

    def listener(event: str, **kwargs) -> None:
        if event == HIT_EVENT:
            counter["hits"] += 1

    jax.monitoring.register_event_listener(listener)
    try:
        yield counter
    finally:
        jax.monitoring.unregister_event_listener(listener)
