"""Runs a small evolutionary search with a deterministic fake evaluator (for crash tests)."""

import hashlib
import json
import sys
import time

from alphanet_jax import search, search_space


def fake_evaluate(subnet):
    h = int(hashlib.sha256(subnet.to_json().encode()).hexdigest()[:8], 16)
    time.sleep(0.1)
    return {"top1": 50 + (h % 5000) / 100.0, "top5": 90.0, "loss": 1.0, "count": 10}


if __name__ == "__main__":
    workdir = sys.argv[1]
    cfg = dict(parent_popu_size=24, mutate_size=12, crossover_size=12, evo_iter=6, flops_min=0.0,
               flops_max=10.0, flops_step=0.05, seed=3)
    # Every row records this context; a resumed run reuses them only because it is the same.
    context = {"weights": {"source": "/fake", "step": 1, "fingerprint": "f" * 64}, "calibration": {"batches": 2}}
    front = search.run_search(fake_evaluate, search_space.get_space("tiny"), cfg, workdir, plot=False,
                              log=lambda *a: None, context=context)
    print(json.dumps([[r["subnet"], r["top1"]] for r in front]))
