"""BN-calibration and evaluation throughput of one subnet of the masked supernet.

Synthetic images (random normal, NHWC float32) at the data pipeline's size (224 for the
AlphaNet space, 32 for the tiny space) go through `alphanet_jax.evaluate`'s jitted steps
on a data-parallel mesh over all visible devices; the subnet enters as arrays, so the
numbers hold for every subnet of that resolution. Host-to-device transfer of each batch
is included (as in real use); data loading is not.

    python benchmarks/eval_throughput.py                                  # tiny space, CPU-sized
    python benchmarks/eval_throughput.py --space alphanet --subnet a0 --batch 32 --batches 4

"compile s" is the first call (trace + compile + one batch) minus one steady-state batch.

--mode masked (default) runs the subnet inside the masked supernet: one compiled program per
resolution serves every subnet, but every layer runs at maximum width. --mode static extracts
the sliced subnet (`export.extract_subnet`) and compiles it: fewer FLOPs per image, one compile
per subnet. "s/subnet (reference protocol)" projects what one search candidate costs with the
reference's protocol (64 calibration batches of 256 + 50,000 validation images): for static,
compile time included (paid again for every subnet); for masked, without it (paid once per
resolution).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))


class StaticEvaluator:
    """The sliced subnet, compiled for itself: the same calibrate / evaluate calls as `Evaluator`."""

    def __init__(self, space, variables, subnet, mesh, dtype, depthwise_impl="auto"):
        import jax
        import jax.numpy as jnp

        from alphanet_jax import export
        from alphanet_jax.mesh import replicated, to_global

        self.mesh, self._to_global = mesh, to_global
        model, sliced = export.extract_subnet(variables, subnet, space, dtype=dtype)
        model = model.clone(depthwise_impl=depthwise_impl)
        rep = self._rep = replicated(mesh)
        self.variables = jax.device_put(sliced, rep)

        def calib_step(v, acc, images):
            _, new = model.apply(v, images, train=True, mutable=["batch_stats"])
            return jax.tree.map(lambda a, n: a + n, acc, new["batch_stats"])

        def eval_step(v, acc, images, labels, mask):
            logits = model.apply(v, images, train=False)
            hit = (jnp.argmax(logits, -1) == labels) & mask
            return {"top1": acc["top1"] + jnp.sum(hit, dtype=jnp.int32),
                    "count": acc["count"] + jnp.sum(mask, dtype=jnp.int32)}

        self._calib = jax.jit(calib_step, out_shardings=rep)
        self._eval = jax.jit(eval_step, out_shardings=rep)
        self._zeros = jax.jit(lambda t: jax.tree.map(jnp.zeros_like, t), out_shardings=rep)

    def calibrate(self, variables, subnet, batches):
        import jax
        acc = self._zeros(self.variables["batch_stats"])
        n = 0
        for b in batches:
            acc = self._calib(self.variables, acc, self._to_global({"image": b["image"]}, self.mesh)["image"])
            n += 1
        stats = jax.tree.map(lambda a: a / n, acc)
        return {"params": self.variables["params"], "batch_stats": stats}

    def evaluate(self, variables, subnet, batches):
        import jax
        import numpy as np
        acc = jax.device_put({"top1": np.int32(0), "count": np.int32(0)}, self._rep)
        for b in batches:
            g = self._to_global({k: b[k] for k in ("image", "label", "mask")}, self.mesh)
            acc = self._eval(variables, acc, g["image"], g["label"], g["mask"])
        acc = jax.device_get(acc)
        return {"top1": 100.0 * int(acc["top1"]) / max(int(acc["count"]), 1), "count": int(acc["count"])}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", default="tiny", choices=["tiny", "alphanet"])
    ap.add_argument("--subnet", default=None,
                    help="preset (a0..a6, a5_1), 'min', 'max' or a JSON file; default: min for tiny, a0 for alphanet")
    ap.add_argument("--batch", type=int, default=None, help="global batch (default 256 tiny, 32 alphanet)")
    ap.add_argument("--batches", type=int, default=None, help="timed batches per phase (default 20 tiny, 4 alphanet)")
    ap.add_argument("--image-size", type=int, default=None, help="input size (default 32 tiny, 224 alphanet)")
    ap.add_argument("--devices", type=int, default=-1, help="mesh size (-1: all devices)")
    ap.add_argument("--mode", default="masked", choices=["masked", "static"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    ap.add_argument("--json", default="", help="also write the figures to this JSON file")
    ap.add_argument("--depthwise_impl", default="auto", choices=["auto", "xla", "shift", "taps"],
                    help="see depthwise.depthwise (auto: taps on CPU, xla elsewhere)")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from alphanet_jax import evaluate as E
    from alphanet_jax.flops import count_flops
    from alphanet_jax.mesh import make_mesh
    from alphanet_jax.presets import as_subnet
    from alphanet_jax.search_space import get_space
    from alphanet_jax.supernet import Supernet, init_variables

    tiny = args.space == "tiny"
    space = get_space(args.space)
    subnet = as_subnet(args.subnet or ("min" if tiny else "a0"), space)
    batch = args.batch or (256 if tiny else 32)
    nb = args.batches or (20 if tiny else 4)
    size = args.image_size or (32 if tiny else 224)

    mesh = make_mesh(args.devices)
    dtype = jnp.dtype(args.dtype)
    model = Supernet(space=space, dtype=dtype, depthwise_impl=args.depthwise_impl)
    t = time.perf_counter()
    variables = jax.block_until_ready(init_variables(space, seed=0))
    t_init = time.perf_counter() - t
    if args.mode == "masked":
        ev = E.get_evaluator(model, mesh)
        variables = ev.place_variables(variables)
    else:
        ev = StaticEvaluator(space, variables, subnet, mesh, dtype, args.depthwise_impl)

    rng = np.random.default_rng(0)
    per_host = batch // jax.process_count()
    host = dict(image=rng.normal(size=(per_host, size, size, 3)).astype(np.float32),
                label=rng.integers(0, space.num_classes, per_host).astype(np.int32),
                mask=np.ones(per_host, bool))

    def timed(fn):
        t = time.perf_counter()
        out = jax.block_until_ready(fn())
        return time.perf_counter() - t, out

    # First calls: trace + compile + one batch.
    t_c1, cal = timed(lambda: ev.calibrate(variables, subnet, [host]))
    t_e1, _ = timed(lambda: ev.evaluate(cal, subnet, [host]))
    # Steady state.
    t_c, cal = timed(lambda: ev.calibrate(variables, subnet, [host] * nb))
    t_e, res = timed(lambda: ev.evaluate(cal, subnet, [host] * nb))
    calib_ips, eval_ips = nb * batch / t_c, nb * batch / t_e
    compile_c = max(0.0, t_c1 - t_c / nb)
    compile_e = max(0.0, t_e1 - t_e / nb)
    assert res["count"] == nb * batch, res

    dev = jax.devices()[0]
    device = f"{mesh.devices.size} x {getattr(dev, 'device_kind', dev.platform)}"
    name = args.subnet or ("min" if tiny else "a0")
    per_subnet = 64 * 256 / calib_ips + 50_000 / eval_ips + (compile_c + compile_e if args.mode == "static" else 0)
    print(f"supernet init {t_init:.1f}s; subnet {name}: {count_flops(subnet, space):.2f} MFLOPs, "
          f"input {size}x{size} resized in-model to {subnet.resolution}; {nb} timed batches per phase; "
          f"jax {jax.__version__}")
    cols = ["device", "space", "subnet", "mode", "dtype", "res", "batch", "calib img/s", "eval img/s",
            "compile s (calib/eval)", "s/subnet (reference protocol)"]
    row = [device, args.space, name, args.mode, args.dtype, str(subnet.resolution), str(batch), f"{calib_ips:.1f}",
           f"{eval_ips:.1f}", f"{compile_c:.1f} / {compile_e:.1f}", f"{per_subnet:.1f}"]
    if args.json:
        import json
        with open(args.json, "w") as f:
            json.dump(dict(zip(cols, row), jax=jax.__version__, calib_ips=calib_ips, eval_ips=eval_ips,
                           compile_calib_s=compile_c, compile_eval_s=compile_e, s_per_subnet=per_subnet), f, indent=1)
    widths = [max(len(c), len(r)) for c, r in zip(cols, row)]
    print(" | ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("-+-".join("-" * w for w in widths))
    print(" | ".join(r.ljust(w) for r, w in zip(row, widths)))


if __name__ == "__main__":
    from alphanet_jax import malloc_tunables  # first: glibc tunables for the CPU runtime (ALPHANET_HUGEPAGES=0: none)

    malloc_tunables.reexec_with_tunables()
    main()
