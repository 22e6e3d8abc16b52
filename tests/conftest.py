"""Test-wide setup: 8 simulated CPU devices, set before jax is imported."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after the environment above)

# Tests are dominated by XLA compile time on small shapes; skip most optimisation passes.
jax.config.update("jax_disable_most_optimizations", True)
