"""Test-wide setup: 8 simulated CPU devices, set before jax is imported; one compilation cache."""
import atexit
import os
import shutil
import tempfile

import xla_env

if "XLA_FLAGS" not in os.environ:  # 8 simulated devices; fast compiles (tests/xla_env.py)
    os.environ["XLA_FLAGS"] = xla_env.xla_flags(8)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same small programs (the quickstart supernet's step, in-process and in
# worker processes): a persistent compilation cache for the session, inherited by subprocesses,
# compiles each of them once. It only skips repeated compiles; every program still runs.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="alphanet-tests-jax-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    # No size limit: a limit turns on jax's file lock and an eviction scan of the whole directory at every
    # write, which made the suite 35 % slower (15.5 vs 11.4 min). Without the lock, workers writing the
    # same key write the same bytes, and an entry read while half-written fails to load: jax warns and
    # compiles instead (jax_raise_persistent_cache_errors is off).
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

import jax  # noqa: E402  (after the environment above)

# Tests are dominated by XLA compile time on small shapes; skip most optimisation passes.
jax.config.update("jax_disable_most_optimizations", True)
