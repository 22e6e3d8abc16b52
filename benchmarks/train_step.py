r"""Throughput of the sandwich training step on synthetic on-device data.

  python benchmarks/train_step.py                                   # AlphaNet, batch 256/device, bf16 on GPU
  python benchmarks/train_step.py --space=tiny --batch_per_device=16 --steps=5 --image_size=24   # CPU smoke run

One step is exactly the training step: the max subnet at its resolution with dropout and drop-connect
and label-smoothed CE, `num_arch_training - 2` random subnets and the min subnet with the adaptive
alpha-divergence, gradient value clip, SGD Nesterov; inputs at --image_size resized in the model.
Prints devices, dtype, per-device batch, images/s (median over --steps timed steps after warm-up),
ms/step, peak device memory, compile seconds, compiled programs and model FLOPs utilisation
(count_flops MACs x 2 FLOPs x 3 for forward + backward).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# Peak dense bf16 matrix FLOP/s by device kind substring (vendor figures), for the MFU column.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5p": 459.0, "TPU v5 lite": 197.0}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", default="alphanet", help="search space name (alphanet, tiny, ...)")
    p.add_argument("--batch_per_device", type=int, default=256)
    p.add_argument("--image_size", type=int, default=224, help="loader output size, resized in the model")
    p.add_argument("--steps", type=int, default=30, help="timed steps (median reported)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16")
    p.add_argument("--num_arch_training", type=int, default=4)
    p.add_argument("--skip_inactive_blocks", action="store_true", help="lax.cond over depth-inactive blocks")
    p.add_argument("--sync_bn", action="store_true")
    p.add_argument("--peak_tflops", type=float, default=0.0, help="device peak for MFU (default: by device kind)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main() -> None:
    args = parse()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from alphanet_jax import flops, mesh as mesh_lib, search_space as ss, train
    from alphanet_jax.supernet import encode
    from configs import common

    config = common.base_config(args.space if args.space in ss.SPACES else "alphanet", "digits")
    config.model.dtype = args.dtype
    config.model.sync_bn = args.sync_bn
    config.model.skip_inactive_blocks = args.skip_inactive_blocks
    config.sandwich.num_arch_training = args.num_arch_training
    space = ss.get_space(config.space)
    mesh = mesh_lib.make_mesh(-1)
    n_dev = mesh.devices.size
    batch = args.batch_per_device * n_dev
    config.batch_size = batch
    model = train.make_model(config, space)
    tx = train.make_optimizer(config, train.learning_rate_fn(config, 10_000, 100))
    state, _ = train.create_state(model, tx, args.seed, mesh)
    step = train.SandwichStep(model, tx, config, mesh)

    rng = np.random.default_rng(args.seed)
    images = rng.normal(size=(batch, args.image_size, args.image_size, space.in_channels)).astype(np.float32)
    labels = rng.integers(0, space.num_classes, batch).astype(np.int32)
    data = jax.device_put({"image": images, "label": labels}, mesh_lib.batch_sharding(mesh))

    def subnets_for(i: int, res: int | None = None):
        subs = ss.sandwich_subnets(space, args.seed, i, args.num_arch_training)
        if res is not None:  # warm-up: make every resolution appear in the student slots
            subs = [subs[0]] + [s.replace(resolution=res) for s in subs[1:-1]] + [subs[-1]]
        return subs

    # Warm-up: compile every program (max, one student program per resolution, update).
    t0 = time.perf_counter()
    for i, r in enumerate(space.resolutions):
        state, m = step(state, data, [encode(s, space) for s in subnets_for(i, r)], jax.random.PRNGKey(i))
    jax.block_until_ready(state)
    warm = time.perf_counter() - t0
    programs = step.num_compiled()

    times, macs = [], []
    for i in range(args.steps):
        subs = subnets_for(1000 + i)
        encs = [encode(s, space) for s in subs]
        t = time.perf_counter()
        state, m = step(state, data, encs, jax.random.PRNGKey(1000 + i))
        jax.block_until_ready(state["params"])
        times.append(time.perf_counter() - t)
        macs.append(sum(flops.count_flops(s, space) for s in subs) * 1e6 * batch)
    med = statistics.median(times)
    compile_s = max(0.0, warm - med * len(space.resolutions))
    recompiled = step.num_compiled() - programs

    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    peak = (stats or {}).get("peak_bytes_in_use")
    model_tflops = statistics.mean(macs) * 2 * 3 / med / 1e12
    peak_tflops = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in dev.device_kind), 0.0)
    mfu = f"{100 * model_tflops / (peak_tflops * n_dev):.2f}%" if peak_tflops else "n/a"

    rows = [("devices", f"{n_dev} x {dev.device_kind} ({jax.default_backend()})"),
            ("jax", jax.__version__),
            ("space", space.name), ("dtype", str(jnp.dtype(train.compute_dtype(args.dtype)))),
            ("per-device batch", args.batch_per_device), ("input size", args.image_size),
            ("subnets per step", args.num_arch_training),
            ("images/s (median)", f"{batch / med:.1f}"), ("ms/step (median)", f"{1000 * med:.1f}"),
            ("ms/step (min, max)", f"{1000 * min(times):.1f}, {1000 * max(times):.1f}"),
            ("peak device memory", f"{peak / 2**30:.2f} GiB" if peak else "n/a"),
            ("compile seconds (all programs)", f"{compile_s:.1f}"),
            ("compiled programs", f"{programs} (+{recompiled} after warm-up)"),
            ("model TFLOP/s", f"{model_tflops:.3f}"), ("MFU", mfu),
            ("timed steps", args.steps)]
    w = max(len(k) for k, _ in rows)
    print("sandwich training step")
    for k, v in rows:
        print(f"  {k:<{w}}  {v}")


if __name__ == "__main__":
    main()
