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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", default="alphanet")
    p.add_argument("--batch_per_device", type=int, default=8)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip_inactive_blocks", action="store_true")
    p.add_argument("--depthwise_impl", default="auto")
    p.add_argument("--scan_blocks", default="auto")
    p.add_argument("--resolutions", default="", help="comma-separated student resolutions to time (default: all)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main() -> None:
    args = parse()
    import jax
    import numpy as np

    from alphanet_jax import mesh as mesh_lib, search_space as ss, train
    from alphanet_jax.supernet import encode
    from configs import common

    config = common.base_config(args.space if args.space in ss.SPACES else "alphanet", "digits")
    config.model.dtype = args.dtype
    config.model.skip_inactive_blocks = args.skip_inactive_blocks
    config.model.depthwise_impl = args.depthwise_impl
    config.model.scan_blocks = args.scan_blocks
    space = ss.get_space(config.space)
    mesh = mesh_lib.make_mesh(-1)
    batch = args.batch_per_device * mesh.devices.size
    config.batch_size = batch
    model = train.make_model(config, space)
    tx = train.make_optimizer(config, train.learning_rate_fn(config, 10_000, 100))
    state, _ = train.create_state(model, tx, args.seed, mesh)
    step = train.SandwichStep(model, tx, config, mesh)
    rng = np.random.default_rng(args.seed)
    data = mesh_lib.to_global({
        "image": rng.normal(size=(batch, args.image_size, args.image_size, space.in_channels)).astype(np.float32),
        "label": rng.integers(0, space.num_classes, batch).astype(np.int32)}, mesh)
    images, labels = data["image"], data["label"]
    params, bs = state["params"], state["batch_stats"]
    key = jax.random.PRNGKey(0)
    resolutions = [int(r) for r in args.resolutions.split(",")] if args.resolutions else list(space.resolutions)
    pyrng = ss.step_rng(args.seed, 0)
    random_subnet = ss.sample_subnet(space, pyrng)

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
    first, med = timed(lambda: step.update_fn(state, grads, np.bool_(False)))
    rows.append(("update", first, med))

    print(f"sandwich step programs, {space.name}, {args.dtype}, per-device batch {args.batch_per_device}, "
          f"input {args.image_size}, {mesh.devices.size} x {jax.devices()[0].device_kind}, jax {jax.__version__}, "
          f"skip_inactive={args.skip_inactive_blocks}, depthwise={args.depthwise_impl}, scan={args.scan_blocks}")
    print(f"random subnet: {random_subnet.to_json()}")
    w = max(len(r[0]) for r in rows)
    print(f"  {'program':<{w}}  first run s (compile + run)  median s of {args.repeats}")
    for name, first, med in rows:
        print(f"  {name:<{w}}  {first:10.2f}                   {med:8.3f}")


if __name__ == "__main__":
    main()
