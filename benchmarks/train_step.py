r"""Throughput of the sandwich training step on synthetic on-device data.

  python benchmarks/train_step.py                                   # AlphaNet, batch 256/device, bf16 on GPU
  python benchmarks/train_step.py --space=tiny --batch_per_device=16 --steps=5 --image_size=24   # CPU smoke run
  python benchmarks/train_step.py --xla_stats --json=out.json --profile=prof/   # + XLA cost/memory, trace

One step is exactly the training step: the max subnet at its resolution with dropout and drop-connect
and label-smoothed CE, `num_arch_training - 2` random subnets and the min subnet with the adaptive
alpha-divergence, gradient value clip, SGD Nesterov; inputs at --image_size resized in the model.
Prints devices, dtype, per-device batch, images/s (median over --steps timed steps after warm-up),
ms/step, peak device memory, compile seconds, compiled programs and model FLOPs utilisation
(count_flops MACs x 2 FLOPs x 3 for forward + backward).

--xla_stats adds, per compiled program, XLA's own cost and memory analysis (FLOPs and bytes
it executes, temporary and argument memory): device-independent evidence of what masking,
remat or bf16 change, available even where nothing can be timed. It needs no extra compile:
the programs' lowerings are those precompile already compiled in this process.
--profile writes a jax.profiler trace of a few steps (summarise it with profile_summary.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # jax monitoring event of each XLA compile
CACHE_REQUEST = "/jax/compilation_cache/compile_requests_use_cache"  # each compile with a persistent cache on
# Peak dense bf16 matrix FLOP/s by device kind substring (vendor figures), for the MFU column.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5p": 459.0, "TPU v5 lite": 197.0}


def parse() -> argparse.Namespace:
    from alphanet_jax.supernet import BLOCK_RESIDUALS_VALUES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", default="alphanet", help="search space name (alphanet, tiny, ...)")
    p.add_argument("--batch_per_device", type=int, default=256)
    p.add_argument("--image_size", type=int, default=224, help="loader output size, resized in the model")
    p.add_argument("--steps", type=int, default=30, help="timed steps (median reported)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16")
    p.add_argument("--num_arch_training", type=int, default=4)
    p.add_argument("--skip_inactive_blocks", action="store_true", help="compute no depth-inactive block (model.skip_inactive_blocks)")
    p.add_argument("--remat", action="store_true", help="recompute block activations in the backward pass")
    p.add_argument("--block_residuals", default="auto", choices=BLOCK_RESIDUALS_VALUES,
                   help="what a block keeps for its backward pass (model.block_residuals)")
    p.add_argument("--depthwise_impl", default="auto",
                   help="auto | xla | shift | taps (see depthwise.depthwise; auto: taps on CPU, xla elsewhere)")
    p.add_argument("--scan_blocks", default="auto",
                   help="auto | true | false: scan each stage's same-shape blocks (auto: true on CPU)")
    p.add_argument("--static_min", default="true", choices=("true", "false"),
                   help="run the min subnet sliced in its own program (sandwich.static_min)")
    p.add_argument("--xla_stats", action="store_true", help="print XLA cost/memory analysis per program")
    p.add_argument("--analyze_only", action="store_true",
                   help="compile and print --xla_stats without running a step (sizes a config without the memory)")
    p.add_argument("--profile", default="", help="write a jax.profiler trace of 3 steps to this folder")
    p.add_argument("--compile_cache", default="none",
                   help="persistent compilation cache (config.compile_cache): none (default: cold compiles), auto or a "
                        "directory; run twice with one directory to time a run that loads its programs")
    p.add_argument("--compile_workers", type=int, default=0, help="threads compiling the programs (0: auto)")
    p.add_argument("--json", default="", help="also write the figures to this JSON file")
    p.add_argument("--label", default="", help="a name for this configuration in the JSON output")
    p.add_argument("--sync_bn", action="store_true")
    p.add_argument("--peak_tflops", type=float, default=0.0, help="device peak for MFU (default: by device kind)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def _gib(x) -> str:
    return f"{x / 2**30:.3f}" if x is not None else "n/a"


def xla_program_stats(step, state, data, encs_by_res: dict, rng) -> list[dict]:
    """XLA's cost and memory analysis of every program of one sandwich step (compiled ahead of time)."""
    rows = []
    for name, lower in step.lowerings(state, data, encs_by_res, rng).items():
        t = time.perf_counter()
        compiled = lower().compile()
        secs = time.perf_counter() - t
        cost = compiled.cost_analysis()
        cost = (cost[0] if isinstance(cost, (list, tuple)) and cost else cost) or {}
        mem = compiled.memory_analysis()
        get = lambda k: getattr(mem, k, None) if mem is not None else None  # noqa: E731
        rows.append({"program": name, "gflop": cost.get("flops", float("nan")) / 1e9,
                     "gbytes_accessed": cost.get("bytes accessed", float("nan")) / 1e9,
                     "temp_bytes": get("temp_size_in_bytes"), "argument_bytes": get("argument_size_in_bytes"),
                     "output_bytes": get("output_size_in_bytes"), "alias_bytes": get("alias_size_in_bytes"),
                     "compile_or_load_s": secs})
    return rows


def print_xla_stats(rows: list[dict], useful_gflop: dict) -> None:
    print("XLA analysis per program (per device; FLOPs as XLA counts them, masked channels included)")
    cols = ["program", "XLA GFLOP", "useful GFLOP", "GB accessed", "temp GiB", "args GiB", "out GiB",
            "compile/load s"]
    table = [[r["program"], f"{r['gflop']:.4g}", useful_gflop.get(r["program"], "-"),
              f"{r['gbytes_accessed']:.4g}", _gib(r["temp_bytes"]), _gib(r["argument_bytes"]),
              _gib(r["output_bytes"]), f"{r['compile_or_load_s']:.1f}"] for r in rows]
    widths = [max(len(c), *(len(str(t[i])) for t in table)) for i, c in enumerate(cols)]
    print("  " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for t in table:
        print("  " + " | ".join(str(v).ljust(w) for v, w in zip(t, widths)))
    peak = max((r["temp_bytes"] or 0) + (r["argument_bytes"] or 0) + (r["output_bytes"] or 0)
               - (r["alias_bytes"] or 0) for r in rows)
    print(f"  largest program: temp + arguments + outputs - aliased = {_gib(peak)} GiB "
          "(XLA's estimate of the step's peak, live buffers of other programs aside)")


def build(args: argparse.Namespace):
    """(config, space, mesh, model, tx, state, step, data) of a sandwich step as the flags say; the data
    is one synthetic global batch at --image_size. Shared with step_programs.py."""
    import jax
    import numpy as np

    from alphanet_jax import mesh as mesh_lib, sandwich, search_space as ss, spaces, train
    from configs import common

    config = common.base_config(args.space if args.space in spaces.SPACES else "alphanet", "digits")
    config.model.dtype = args.dtype
    config.model.sync_bn = getattr(args, "sync_bn", False)
    config.model.skip_inactive_blocks = "true" if args.skip_inactive_blocks else "false"
    config.model.remat = getattr(args, "remat", False)
    config.model.block_residuals = getattr(args, "block_residuals", "auto")
    config.model.depthwise_impl = args.depthwise_impl
    config.model.scan_blocks = args.scan_blocks
    config.sandwich.num_arch_training = getattr(args, "num_arch_training", 4)
    config.sandwich.static_min = args.static_min == "true"
    space = ss.get_space(config.space)
    mesh = mesh_lib.make_mesh(-1)
    batch = args.batch_per_device * mesh.devices.size
    config.batch_size = batch
    model = train.make_model(config, space)
    tx = train.make_optimizer(config, train.learning_rate_fn(config, 10_000, 100))
    state, _ = train.create_state(model, tx, args.seed, mesh)
    step = sandwich.SandwichStep(model, tx, config, mesh)
    rng = np.random.default_rng(args.seed)
    images = rng.normal(size=(batch, args.image_size, args.image_size, space.in_channels)).astype(np.float32)
    labels = rng.integers(0, space.num_classes, batch).astype(np.int32)
    data = jax.device_put({"image": images, "label": labels}, mesh_lib.batch_sharding(mesh))
    return config, space, mesh, model, tx, state, step, data


def main() -> None:
    args = parse()
    import jax

    import jax.numpy as jnp
    import numpy as np

    from alphanet_jax import compile_cache, flops, sampling, sandwich, train
    from alphanet_jax.subnet_encoding import encode

    cache_dir = compile_cache.enable(args.compile_cache)  # before the first compile (state init is one)
    config, space, mesh, model, tx, state, step, data = build(args)
    n_dev = mesh.devices.size
    batch = args.batch_per_device * n_dev
    dtype = str(jnp.dtype(train.compute_dtype(args.dtype)))

    def subnets_for(i: int, res: int | None = None):
        subs = sampling.sandwich_subnets(space, args.seed, i, args.num_arch_training)
        if res is not None:  # warm-up: make every resolution appear in the student slots
            subs = [subs[0]] + [s.replace(resolution=res) for s in subs[1:-1]] + [subs[-1]]
        return subs

    max_net = space.max_subnet()
    encs_by_res = sandwich.step_encodings(space)
    # What the programs must compute, per device, forward + backward (MACs x 2 x 3), for a subnet at r:
    # at most the max subnet at r (what the masked program executes).
    per_dev = args.batch_per_device

    def gflop(subnet) -> str:
        return f"{flops.count_flops(subnet, space) * 6e6 * per_dev / 1e9:.1f}"

    useful = {f"subnets @ {r}" + (" (and max)" if r == max_net.resolution else ""):
              "<= " + gflop(max_net.replace(resolution=r)) for r in space.resolutions}
    result = {"label": args.label, "space": space.name, "dtype": dtype, "devices": n_dev,
              "device_kind": jax.devices()[0].device_kind, "backend": jax.default_backend(),
              "jax": jax.__version__, "batch_per_device": args.batch_per_device, "image_size": args.image_size,
              "remat": args.remat, "block_residuals": args.block_residuals,
              "skip_inactive_blocks": args.skip_inactive_blocks,
              "depthwise_impl": args.depthwise_impl, "scan_blocks": args.scan_blocks,
              "num_arch_training": args.num_arch_training}

    if args.analyze_only:
        rows = xla_program_stats(step, state, data, encs_by_res, jax.random.PRNGKey(0))
        print(f"sandwich training step, {space.name}, {dtype}, per-device batch {per_dev}, "
              f"remat={args.remat}, skip_inactive_blocks={args.skip_inactive_blocks}, {n_dev} x "
              f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
        print_xla_stats(rows, useful)
        result["xla"] = rows
        _write_json(args.json, result)
        return

    # Compile every program (one per resolution, zeros, update), then
    # one warm-up step per resolution.
    t0 = time.perf_counter()
    with compile_cache.count_hits() as cached:
        per_program = step.precompile(state, data, encs_by_res, jax.random.PRNGKey(0),
                                      max_workers=args.compile_workers or None)
    compile_s = time.perf_counter() - t0
    late = []  # compilations after precompile (0 unless its lowering differs from a step's)
    listener = lambda event, secs, **kw: late.append(secs) if event == BACKEND_COMPILE else None  # noqa: E731
    # With a persistent compilation cache a late compile may load instead (no backend-compile event).
    requests = []  # every compile request when the cache is on (a cache miss also compiles: not both)
    loaded = lambda event, **kw: requests.append(event) if event == CACHE_REQUEST else None  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    jax.monitoring.register_event_listener(loaded)
    for i, r in enumerate(space.resolutions):
        state, m = step(state, data, [encode(s, space) for s in subnets_for(i, r)], jax.random.PRNGKey(i))
    jax.block_until_ready(state)
    programs = step.num_compiled()

    times, macs, dispatch = [], [], []
    for i in range(args.steps):
        subs = subnets_for(1000 + i)
        encs = [encode(s, space) for s in subs]
        t = time.perf_counter()
        state, m = step(state, data, encs, jax.random.PRNGKey(1000 + i))
        dispatch.append(time.perf_counter() - t)  # the host is free again: no sync inside a step
        jax.block_until_ready(state["params"])
        times.append(time.perf_counter() - t)
        macs.append(sum(flops.count_flops(s, space) for s in subs) * 1e6 * batch)
    med = statistics.median(times)
    recompiled = step.num_compiled() - programs
    jax.monitoring.unregister_event_duration_listener(listener)
    jax.monitoring.unregister_event_listener(loaded)

    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    peak = (stats or {}).get("peak_bytes_in_use")
    model_tflops = statistics.mean(macs) * 2 * 3 / med / 1e12
    peak_tflops = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in dev.device_kind), 0.0)
    mfu = f"{100 * model_tflops / (peak_tflops * n_dev):.2f}%" if peak_tflops else "n/a"

    rows = [("devices", f"{n_dev} x {dev.device_kind} ({jax.default_backend()})"),
            ("jax", jax.__version__),
            ("space", space.name), ("dtype", dtype),
            ("per-device batch", args.batch_per_device), ("input size", args.image_size),
            ("subnets per step", args.num_arch_training),
            ("remat / block residuals / skip inactive / depthwise / scan",
             f"{args.remat} / {args.block_residuals} / {args.skip_inactive_blocks} / {args.depthwise_impl} / "
             f"{args.scan_blocks}"),
            ("images/s (median)", f"{batch / med:.1f}"), ("ms/step (median)", f"{1000 * med:.1f}"),
            ("ms/step (min, max)", f"{1000 * min(times):.1f}, {1000 * max(times):.1f}"),
            ("host dispatch ms/step (median)", f"{1000 * statistics.median(dispatch):.1f} (returns before the "
                                               "device finishes unless the host is the bottleneck)"),
            ("peak device memory", f"{peak / 2**30:.2f} GiB" if peak else "n/a"),
            ("compile seconds (parallel)", f"{compile_s:.1f} wall; per program: " +
             ", ".join(f"{k} {v:.1f}" for k, v in per_program.items())),
            ("compilation cache", f"{cache_dir}: {cached['hits']} of {len(per_program)} programs loaded"
             if cache_dir else "off (--compile_cache)"),
            ("compiled programs", f"{programs} (+{recompiled} after warm-up)"),
            ("compilations after precompile", f"{max(len(late), len(requests))} ({sum(late):.1f} s)"),
            ("model TFLOP/s", f"{model_tflops:.3f}"), ("MFU", mfu),
            ("timed steps", args.steps)]
    w = max(len(k) for k, _ in rows)
    print("sandwich training step")
    for k, v in rows:
        print(f"  {k:<{w}}  {v}")
    result.update(images_per_s=batch / med, ms_per_step=1000 * med, ms_min=1000 * min(times),
                  ms_max=1000 * max(times), dispatch_ms=1000 * statistics.median(dispatch), peak_bytes=peak,
                  compile_s=compile_s, compile_s_per_program=per_program, programs=programs,
                  compile_cache=cache_dir, programs_loaded_from_cache=cached["hits"],
                  late_compiles=max(len(late), len(requests)),
                  recompiled=recompiled, model_tflops=model_tflops, mfu=mfu, steps=args.steps)

    if args.profile:
        with jax.profiler.trace(args.profile, create_perfetto_trace=True):
            for i in range(3):
                state, m = step(state, data, [encode(s, space) for s in subnets_for(2000 + i)],
                                jax.random.PRNGKey(2000 + i))
            jax.block_until_ready(state["params"])
        print(f"profile of 3 steps written under {args.profile}")
    if args.xla_stats:
        rows = xla_program_stats(step, state, data, encs_by_res, jax.random.PRNGKey(0))
        print_xla_stats(rows, useful)
        result["xla"] = rows
    _write_json(args.json, result)


def _write_json(path: str, result: dict) -> None:
    if path:
        import json
        with open(path, "w") as f:
            json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    from alphanet_jax import malloc_tunables  # first: glibc tunables for the CPU runtime (ALPHANET_HUGEPAGES=0: none)

    malloc_tunables.reexec_with_tunables()
    main()
