r"""Seconds per program of the sandwich step, each timed on its own (where a step's time goes).

  python benchmarks/step_programs.py --space=alphanet --batch_per_device=8 --dtype=float32   # CPU, AlphaNet
  python benchmarks/step_programs.py --space=tiny --batch_per_device=16 --image_size=32 --repeats=2

Times, after one untimed run each: the max subnet (labels, dropout, drop-connect) in its resolution's
program; a random student at each resolution (masked program); the min subnet in its static program
and, for comparison, masked in its resolution's program; the update. Median of --repeats runs, each
with block_until_ready. Also prints the compile seconds of each program (with its first run). Same flags for the model as train_step.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), HERE]  # the package and configs/; train_step.build


def parse() -> argparse.Namespace:
    from alphanet_jax.supernet import BLOCK_RESIDUALS_VALUES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", default="alphanet")
    p.add_argument("--batch_per_device", type=int, default=8)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip_inactive_blocks", action="store_true")
    p.add_argument("--block_residuals", default="auto", choices=BLOCK_RESIDUALS_VALUES)
    p.add_argument("--depthwise_impl", default="auto")
    p.add_argument("--scan_blocks", default="auto")
    p.add_argument("--resolutions", default="", help="comma-separated student resolutions to time (default: all)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main() -> None:
    args = parse()
    import jax
    import numpy as np

    from alphanet_jax import sampling
    from alphanet_jax.subnet_encoding import encode
    from train_step import build

    args.static_min = "true"
    config, space, mesh, model, tx, state, step, data = build(args)
    images, labels = data["image"], data["label"]
    params, bs = state["params"], state["batch_stats"]
    key = jax.random.PRNGKey(0)
    resolutions = [int(r) for r in args.resolutions.split(",")] if args.resolutions else list(space.resolutions)
    random_subnet = sampling.sample_subnet(space, sampling.step_rng(args.seed, 0))

    def timed(fn):
        """(compile + first run s, median s of the repeats) of fn()."""
        t = time.perf_counter()
        jax.block_until_ready(fn())
        first = time.perf_counter() - t
        runs = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            jax.block_until_ready(fn())
            runs.append(time.perf_counter() - t)
        return first, statistics.median(runs)

    rows = []
    grads, teacher, _ = step.max_subnet(params, bs, images, labels, encode(space.max_subnet(), space), key)
    jax.block_until_ready(grads)
    first, med = timed(lambda: step.max_subnet(params, bs, images, labels, encode(space.max_subnet(), space), key))
    rows.append((f"max @ {space.max_subnet().resolution}", first, med))
    for r in resolutions:
        enc = encode(random_subnet.replace(resolution=r), space)
        first, med = timed(lambda: step.subnet_fn(params, bs, grads, images, labels, teacher, enc, key,
                                                  np.bool_(False)))
        rows.append((f"random student @ {r} (masked)", first, med))
    min_net = space.min_subnet()
    enc = encode(min_net, space)
    first, med = timed(lambda: step.min_fn(params, bs, grads, images, labels, teacher))
    rows.append((f"min @ {min_net.resolution} (static)", first, med))
    if min_net.resolution in resolutions:  # its resolution's masked program is compiled already
        first, med = timed(lambda: step.subnet_fn(params, bs, grads, images, labels, teacher, enc, key,
                                                  np.bool_(False)))
        rows.append((f"min @ {min_net.resolution} (masked)", first, med))
    first, med = timed(lambda: step.update_fn(state, grads))
    rows.append(("update", first, med))

    print(f"sandwich step programs, {space.name}, {args.dtype}, per-device batch {args.batch_per_device}, "
          f"input {args.image_size}, {mesh.devices.size} x {jax.devices()[0].device_kind}, jax {jax.__version__}, "
          f"skip_inactive={args.skip_inactive_blocks}, block_residuals={args.block_residuals}, depthwise={args.depthwise_impl}, scan={args.scan_blocks}")
    print(f"random subnet: {random_subnet.to_json()}")
    w = max(len(r[0]) for r in rows)
    print(f"  {'program':<{w}}  first run s (compile + run)  median s of {args.repeats}")
    for name, first, med in rows:
        print(f"  {name:<{w}}  {first:10.2f}                   {med:8.3f}")


if __name__ == "__main__":
    from alphanet_jax import malloc_tunables  # first: glibc tunables for the CPU runtime (ALPHANET_HUGEPAGES=0: none)

    malloc_tunables.reexec_with_tunables()
    main()
