"""BN-calibration and evaluation throughput of one subnet of the masked supernet.

Synthetic images (random normal, NHWC float32) at the data pipeline's size (224 for the
AlphaNet space, 32 for the tiny space) go through `alphanet_jax.evaluate`'s jitted steps
on a data-parallel mesh over all visible devices; the subnet enters as arrays, so the
numbers hold for every subnet of that resolution. Host-to-device transfer of each batch
is included (as in real use); data loading is not.

    python benchmarks/eval_throughput.py                                  # tiny space, CPU-sized
    python benchmarks/eval_throughput.py --space alphanet --subnet a0 --batch 32 --batches 4

"compile s" is the first call (trace + compile + one batch) minus one steady-state batch.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", default="tiny", choices=["tiny", "alphanet"])
    ap.add_argument("--subnet", default=None,
                    help="preset (a0..a6, a5_1), 'min', 'max' or a JSON file; default: min for tiny, a0 for alphanet")
    ap.add_argument("--batch", type=int, default=None, help="global batch (default 256 tiny, 32 alphanet)")
    ap.add_argument("--batches", type=int, default=None, help="timed batches per phase (default 20 tiny, 4 alphanet)")
    ap.add_argument("--image-size", type=int, default=None, help="input size (default 32 tiny, 224 alphanet)")
    ap.add_argument("--devices", type=int, default=-1, help="mesh size (-1: all devices)")
    args = ap.parse_args(argv)

    import jax

    from alphanet_jax import evaluate as E
    from alphanet_jax.flops import count_flops
    from alphanet_jax.mesh import make_mesh
    from alphanet_jax.search_space import as_subnet, get_space
    from alphanet_jax.supernet import Supernet, init_variables

    tiny = args.space == "tiny"
    space = get_space(args.space)
    subnet = as_subnet(args.subnet or ("min" if tiny else "a0"), space)
    batch = args.batch or (256 if tiny else 32)
    nb = args.batches or (20 if tiny else 4)
    size = args.image_size or (32 if tiny else 224)

    mesh = make_mesh(args.devices)
    model = Supernet(space=space)
    t = time.perf_counter()
    variables = jax.block_until_ready(init_variables(space, seed=0))
    t_init = time.perf_counter() - t
    ev = E.get_evaluator(model, mesh)
    variables = ev.place_variables(variables)

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
    print(f"supernet init {t_init:.1f}s; subnet {name}: {count_flops(subnet, space):.2f} MFLOPs, "
          f"input {size}x{size} resized in-model to {subnet.resolution}; {nb} timed batches per phase; "
          f"jax {jax.__version__}")
    cols = ["device", "space", "subnet", "res", "batch", "calib img/s", "eval img/s", "compile s (calib/eval)"]
    row = [device, args.space, name, str(subnet.resolution), str(batch), f"{calib_ips:.1f}", f"{eval_ips:.1f}",
           f"{compile_c:.1f} / {compile_e:.1f}"]
    widths = [max(len(c), len(r)) for c, r in zip(cols, row)]
    print(" | ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("-+-".join("-" * w for w in widths))
    print(" | ".join(r.ljust(w) for r, w in zip(row, widths)))


if __name__ == "__main__":
    main()
