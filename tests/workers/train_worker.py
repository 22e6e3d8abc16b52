"""Trains the tiny supernet for a few steps in `argv[1]`, then writes its final parameters (crash tests)."""

import sys

import jax
import numpy as np

from configs import quickstart
from alphanet_jax import train


def config(steps: int):
    c = quickstart.get_config()
    c.batch_size = 16
    c.total_steps = steps
    c.warmup_steps = 2
    c.log_every_steps = 1
    c.checkpoint.every_steps = 1
    c.checkpoint.keep = 2
    c.eval.at_end = False
    c.data.num_workers = 1
    return c


if __name__ == "__main__":
    workdir, steps = sys.argv[1], int(sys.argv[2])
    out = train.train_and_evaluate(config(steps), workdir)
    if not out["interrupted"]:
        leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(out["state"]["params"]))[0]
        np.savez(f"{workdir}/final_params.npz", **{jax.tree_util.keystr(p): v for p, v in leaves})
    print("interrupted" if out["interrupted"] else "finished", flush=True)
