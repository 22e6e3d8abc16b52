"""The benchmark scripts keep working (tiny settings on CPU; the figures themselves are not asserted)."""

import json
import os
import subprocess
import sys

import pytest

import xla_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, timeout=240):
    env = dict(os.environ, XLA_FLAGS=xla_env.xla_flags(2), JAX_PLATFORMS="cpu",
               JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_train_step_analyze_only_sizes_a_config_without_running_it(tmp_path):
    js = tmp_path / "a.json"
    out = _run(["benchmarks/train_step.py", "--space=tiny", "--batch_per_device=64", "--analyze_only",
                "--image_size=16", f"--json={js}"])
    assert "images/s" not in out and "largest program" in out, out
    rows = json.loads(js.read_text())["xla"]
    # the program at the max subnet's resolution does more work than the one at the lower resolution
    assert rows[0]["program"].startswith("subnets @") and rows[1]["program"].endswith("(and max)")
    assert rows[1]["gflop"] > rows[0]["gflop"] > 0


@pytest.mark.slow
def test_gpu_suite_runs_every_measurement_with_tiny_settings(tmp_path):
    """benchmarks/gpu_suite.sh is what a GPU session runs in one call: check its plumbing on CPU, and with
    it train_step.py's figures, --remat, --xla_stats, --profile, --json and profile_summary.py."""
    env = dict(os.environ, XLA_FLAGS=xla_env.xla_flags(2), JAX_PLATFORMS="cpu",
               JAX_DISABLE_MOST_OPTIMIZATIONS="1", SUITE_SMALL="1", OUT=str(tmp_path), PYTHON=sys.executable)
    out = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "all"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "exit 1" not in out.stdout and "exit 124" not in out.stdout, out.stdout[-5000:]
    for key in ("images/s (median)", "ms/step (median)", "peak device memory", "compile seconds",
                "compiled programs", "MFU", "2 x cpu", "XLA analysis per program"):
        assert key in out.stdout, key
    assert "(+0 after warm-up)" in out.stdout  # nothing recompiles once every resolution was seen
    for label in ("bf16", "bf16_skip", "bf16_remat", "fp32", "bf16_taps", "bf16_convs"):
        r = json.loads((tmp_path / f"train_{label}.json").read_text())
        assert r["label"] == label and r["images_per_s"] > 0 and r["recompiled"] == 0 and r["late_compiles"] == 0
        assert r["devices"] == 2 and r["remat"] is (label == "bf16_remat")
        assert r["block_residuals"] == ("convs" if label == "bf16_convs" else "auto")
    programs = json.loads((tmp_path / "train_bf16.json").read_text())["xla"]  # --xla_stats
    assert [row["program"] for row in programs] == ["subnets @ 16", "subnets @ 24 (and max)", "min subnet @ 16 (static)", "update"]
    assert programs[0]["gflop"] > 0 and programs[0]["temp_bytes"] > 0 and programs[0]["argument_bytes"] > 0
    for s in ("max",):  # SUITE_SMALL evaluates the max subnet only (min and max are one code path)
        for mode in ("masked", "static"):
            r = json.loads((tmp_path / f"eval_{s}_{mode}.json").read_text())
            assert r["mode"] == mode and r["eval_ips"] > 0 and r["calib_ips"] > 0
    summary = (tmp_path / "profile_bf16.txt").read_text()  # --profile, read by profile_summary.py
    assert "time per kind of work" in summary and "jit__subnet" in summary, summary[-2000:]
