"""An evolutionary search killed with SIGKILL at random moments resumes to the uninterrupted result."""

import json
import os
import random
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "workers", "search_worker.py")


def _start(workdir):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, WORKER, str(workdir)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(p, timeout=120):
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])


def _keys(workdir):
    with open(os.path.join(workdir, "evaluated.jsonl")) as f:
        return [json.loads(line)["key"] for line in f if line.strip()]


def test_sigkill_at_random_moments_resumes_to_the_same_front(tmp_path):
    straight = _finish(_start(tmp_path / "straight"))
    n_straight = len(_keys(tmp_path / "straight"))
    rng = random.Random(0)
    work = tmp_path / "killed"
    kills = 0
    for trial in range(40):  # ~12 s of evaluations; each run gets killed after 0.5-2.5 s
        p = _start(work)
        time.sleep(rng.uniform(0.5, 2.5))
        if p.poll() is not None:  # it finished: the remaining work was done
            p.communicate()
            break
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
        kills += 1
    assert kills >= 5
    resumed = _finish(_start(work))
    assert resumed == straight
    keys = _keys(work)
    assert len(keys) == len(set(keys)) == n_straight  # nothing evaluated twice, nothing lost
