"""The benchmark scripts keep working (tiny settings on CPU; the figures themselves are not asserted)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, timeout=240):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_train_step_benchmark_runs_on_cpu():
    out = _run(["benchmarks/train_step.py", "--space=tiny", "--batch_per_device=4", "--steps=2",
                "--image_size=16"])
    for key in ("images/s (median)", "ms/step (median)", "peak device memory", "compile seconds",
                "compiled programs", "MFU"):
        assert key in out, out
    assert "2 x cpu" in out
    assert "(+0 after warm-up)" in out  # nothing recompiles once every resolution was seen


def test_eval_throughput_benchmark_runs_on_cpu():
    out = _run(["benchmarks/eval_throughput.py", "--space", "tiny", "--batch", "16", "--batches", "2",
                "--image-size", "16"])
    assert "img/s" in out or "images/s" in out, out
