"""XLA_FLAGS for the test processes and the processes they start: simulated devices, fast compiles.

Tests are dominated by compile time on tiny shapes. Besides `jax_disable_most_optimizations`, XLA:CPU's
older (non-MLIR) fusion emitters compile the test programs about 2x faster (one scanned supernet's
gradient: 6.6 -> 3.4 s; benchmarks/RESULTS.md, session 13); the slower code they make does not matter at
these shapes. Same HLO, other code generation: results agree within the tests' float32 tolerances (the
whole suite passes either way).
XLA aborts on a flag it does not know, so the flag is used only if this jaxlib accepts it: probed once,
in a child process, and remembered in the environment that pytest-xdist workers and child processes
inherit. The learning test (tests/test_learning.py) runs the production settings instead.
"""

from __future__ import annotations

import os
import subprocess
import sys

FAST_COMPILE_FLAGS = "--xla_cpu_use_fusion_emitters=false"
_PROBED = "ALPHANET_TESTS_FAST_COMPILE_FLAGS"  # the probe's answer: FAST_COMPILE_FLAGS, or "" if refused


def fast_compile_flags() -> str:
    """FAST_COMPILE_FLAGS if this jaxlib's XLA accepts them, else ""."""
    if _PROBED not in os.environ:
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE_FLAGS)
        try:
            ok = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env,
                                capture_output=True, timeout=300).returncode == 0
        except subprocess.TimeoutExpired:
            ok = False
        os.environ[_PROBED] = FAST_COMPILE_FLAGS if ok else ""
    return os.environ[_PROBED]


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test process with `devices` simulated CPU devices."""
    return " ".join(f for f in (f"--xla_force_host_platform_device_count={devices}", fast_compile_flags()) if f)
