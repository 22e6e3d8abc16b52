"""Input-pipeline throughput on real JPEG photographs.

Writes scikit-image's bundled photographs (astronaut, chelsea, coffee, ...) as JPEGs into a
temporary ImageFolder (a few copies each, spread over classes), then measures decoded and
augmented training images per second through ``make_train_iterator`` for several thread counts
and augmentation settings, plus the validation transform, and prints a table.

    python benchmarks/input_pipeline.py [--batch 32] [--batches 8] [--workers 1,2] [--copies 16]

"/core (wall)" divides images/s by min(threads, CPU cores); "/CPU-second" divides the images by
the CPU time this process used, which stays meaningful on a machine shared with other jobs.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "cat", "colorwheel")


def write_image_folder(root: str, copies: int, quality: int = 90) -> int:
    import skimage.data

    n = 0
    for split in ("train", "val"):
        for c in range(4):
            os.makedirs(os.path.join(root, split, f"class{c}"), exist_ok=True)
    for p, name in enumerate(PHOTOS):
        arr = getattr(skimage.data, name)()
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        img = Image.fromarray(arr[..., :3])
        for k in range(copies):
            split = "val" if k == 0 else "train"
            cls = f"class{(p + k) % 4}"
            img.save(os.path.join(root, split, cls, f"{name}_{k}.jpg"), quality=quality)
            n += 1
    return n


def measure(it, batches: int, warmup: int = 1) -> tuple[float, float]:
    """(images per wall-clock second, images per CPU-second of this process)."""
    for _ in range(warmup):
        next(it)
    t, c = time.perf_counter(), time.process_time()
    n = 0
    for _ in range(batches):
        b = next(it)
        n += b["image"].shape[0]
    return n / (time.perf_counter() - t), n / (time.process_time() - c)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--workers", default="")
    ap.add_argument("--copies", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=224)
    args = ap.parse_args(argv)

    from alphanet_jax.data import default_config, make_eval_iterator, make_train_iterator

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = [int(w) for w in args.workers.split(",")] if args.workers else sorted({1, cores})
    with tempfile.TemporaryDirectory() as root:
        n = write_image_folder(root, args.copies)
        sizes = [Image.open(os.path.join(dp, f)).size for dp, _, fs in os.walk(root) for f in fs]
        mean_px = np.mean([w * h for w, h in sizes])
        print(f"ImageFolder: {n} JPEGs from skimage.data {PHOTOS}, mean {mean_px / 1e3:.0f} kpixel "
              f"(~{np.sqrt(mean_px):.0f}^2), CPU cores available: {cores}, PIL {Image.__version__}")
        print(f"output {args.image_size}x{args.image_size}, batch {args.batch}, {args.batches} timed batches "
              f"after 1 warm-up batch\n")
        rows = []
        for augment in ("autoaugment_v0", "flip", "none"):
            for w in workers:
                cfg = default_config("imagefolder")
                cfg.root = root
                cfg.augment = augment
                cfg.num_workers = w
                cfg.image_size = args.image_size
                it = make_train_iterator(cfg, batch_size=args.batch, seed=0)
                ips, ipc = measure(it, args.batches)
                it.close()
                rows.append((f"train/{augment}", w, ips, ips / max(1, min(w, cores)), ipc))
        for w in workers:
            cfg = default_config("imagefolder")
            cfg.root = root
            cfg.num_workers = w
            cfg.image_size = args.image_size
            cfg.train_split = "train"
            t, c = time.perf_counter(), time.process_time()
            cnt = 0
            while cnt < args.batches * args.batch:
                for b in make_eval_iterator(cfg, batch_size=args.batch, split="train"):
                    cnt += int(b["mask"].sum())
            ips, ipc = cnt / (time.perf_counter() - t), cnt / (time.process_time() - c)
            rows.append(("val transform (train split)", w, ips, ips / max(1, min(w, cores)), ipc))
        print(f"{'pipeline':<30}{'threads':>8}{'images/s':>11}{'/core (wall)':>14}{'/CPU-second':>13}")
        for name, w, ips, per_core, ipc in rows:
            print(f"{name:<30}{w:>8}{ips:>11.1f}{per_core:>14.1f}{ipc:>13.1f}")
        print("\n/core (wall) = images/s / min(threads, cores); /CPU-second = images per second of CPU "
              "time used by this process (robust to other load on the machine).")


if __name__ == "__main__":
    main()
