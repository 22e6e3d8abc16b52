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

# Seconds each module took in a whole suite run (2-core box, 2 workers; the modules above ~10 s; session
# 13, benchmarks/RESULTS.md). pytest-xdist hands whole modules (--dist loadscope) to its workers in
# collection order (--no-loadscope-reorder in pyproject.toml): heaviest first, so that no long module
# starts last and leaves one worker idle at the end. Other modules follow in their usual order. Stale
# figures only cost wall time.
MODULE_SECONDS = {
    "test_supernet.py": 461, "test_robustness.py": 263, "test_train.py": 221, "test_benchmarks.py": 153,
    "test_learning.py": 110, "test_multihost.py": 99, "test_crash_search.py": 88, "test_onnx_export.py": 53,
    "test_ghost_bn.py": 52, "test_slimmable.py": 38, "test_layers.py": 27, "test_losses.py": 22,
    "test_errors.py": 20, "test_evaluate.py": 19, "test_data_pipeline.py": 13,
}


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: -MODULE_SECONDS.get(item.path.name, 0))  # stable: keeps each module's order
