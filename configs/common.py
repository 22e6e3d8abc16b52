"""Shared config pieces: the sections every run has, with the reference's values (spec §6)."""

import ml_collections

from alphanet_jax import data, search, search_space


def parse_arg(arg, **defaults):
    """'key=value,flag' -> dict with typed values (big_vision style `--config=file.py:arg`)."""
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
        default = defaults[key]
        if isinstance(default, bool):
            out[key] = value.lower() in ("", "1", "true", "yes")
        else:
            out[key] = type(default)(value) if value else default
    return out


def base_config(space: str = "alphanet", data_source: str = "imagefolder") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.run = "train"  # comma-separated: train, evaluate, search, export
    c.seed = 0
    c.space = ml_collections.ConfigDict(search_space.SPACES[space])

    c.data = data.default_config(data_source)
    c.data_prefetch = 2  # batches decoded ahead in a background thread (0: off)

    c.batch_size = 2048  # global, over all devices and hosts
    c.num_epochs = 360
    c.warmup_epochs = 5
    c.total_steps = -1   # > 0 overrides num_epochs
    c.warmup_steps = -1  # >= 0 overrides warmup_epochs

    c.optim = ml_collections.ConfigDict(dict(
        base_lr=0.1, lr_batch_unit=256, warmup_start_factor=0.001, momentum=0.9, nesterov=True,
        weight_decay=1e-5, grad_clip_value=1.0))
    c.sandwich = ml_collections.ConfigDict(dict(
        num_arch_training=4, distill="alpha", alpha_min=-1.0, alpha_max=1.0, iw_clip=5.0,
        label_smoothing=0.1, dropout=0.2, drop_connect=0.2, drop_connect_only_last_two_stages=True))
    # skip_inactive_blocks: lax.cond skips depth-inactive blocks (saves work on accelerators; on CPU, with
    # the taps depthwise and scanned blocks, the step measured 7 % slower with it, benchmarks/RESULTS.md).
    # remat: recompute block activations in the backward pass (jax.checkpoint per block): less device
    # memory for about one extra forward per subnet; for large per-device batches.
    # depthwise_impl: 'auto' ('taps' on CPU, 'xla' elsewhere), 'xla' (grouped convolution), 'shift' or
    # 'taps' (k*k shifted slices, autodiff or hand-written backward; see layers.depthwise).
    # scan_blocks: 'auto' (True on CPU, False elsewhere): each stage's same-shape blocks run as one
    # lax.scan body, a smaller program that compiles faster (supernet.forward).
    c.model = ml_collections.ConfigDict(dict(dtype="auto", bn_eps=1e-5, sync_bn=False, skip_inactive_blocks=False,
                                             remat=False, depthwise_impl="auto", scan_blocks="auto"))

    c.mesh = ml_collections.ConfigDict(dict(data=-1))  # devices on the data axis (-1: all)
    c.distributed = ml_collections.ConfigDict(dict(
        coordinator_address="", num_processes=0, process_id=-1, auto=False))

    # Compile every program of the step (max, one per resolution, update) in parallel threads before the
    # first step, instead of one after the other as the steps first need them.
    c.precompile = True

    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=3, async_save=True))
    c.log_every_steps = 50
    c.max_consecutive_bad_steps = 20  # stop when this many steps in a row had non-finite gradients
    c.debug_nan_steps = (-1,)  # fault injection for tests: steps whose gradients become NaN

    # Validation of the min and max subnets during training, and the `evaluate` task.
    c.eval = ml_collections.ConfigDict(dict(
        every_steps=0, at_end=True, calib_batches=64, calib_batch_size=256, calib_seed=5, batch_size=256,
        subnets="a0,a1,a2,a3,a4,a5,a5_1,a6", checkpoint=""))
    c.search = search.default_config()
    c.search.calib_batches = 32
    c.export = ml_collections.ConfigDict(dict(subnet="", max_mflops=0.0, directory=""))
    c.export.format = "flax"  # "onnx" also writes model.onnx (needs `pip install -e .[deploy]`)
    c.export.max_latency_ms = 0.0  # > 0: the most accurate searched subnet predicted within this many ms
    # --mode=latency: time the space's parts on this device (runtime xla: jit on the default backend),
    # fit on `fit_subnets` whole subnets, validate on `validate_subnets` others. `table`: a table to search
    # with (e.g. built on the target device); default DIR/latency/table.json. statistic: "median" of the
    # samples (`rounds` rounds of `repeats` runs over all parts or subnets in turn), or "min" (steadier on a
    # machine shared with other work, which only adds time).
    c.latency = ml_collections.ConfigDict(dict(runtime="xla", batch_size=1, warmup=3, repeats=20, rounds=2,
                                               fit_subnets=10, validate_subnets=30, seed=0, table="",
                                               statistic="median"))
    return c


def apply_hardware(c: ml_collections.ConfigDict, hw: str) -> None:
    """Hardware presets: cpu runs float32; gpu, gpu8 and tpu compute in bfloat16."""
    if hw == "cpu":
        c.model.dtype = "float32"
    elif hw in ("gpu", "gpu8", "tpu"):
        c.model.dtype = "bfloat16"
    else:
        raise ValueError(f"unknown hw {hw!r}: cpu, gpu, gpu8 or tpu")


def digits_quickstart(space: str, steps: int) -> ml_collections.ConfigDict:
    """The whole pipeline on the bundled 8x8 digits, upsampled to 24x24, sized for a 2-core CPU."""
    c = base_config(space, "digits")
    c.run = "train,evaluate,search,export"
    c.model.dtype = "float32"
    c.batch_size = 64
    c.total_steps = steps
    c.warmup_steps = 30
    c.optim.base_lr = 0.1
    c.data.num_workers = 2
    c.data.image_size = 24
    c.data.resize_size = 28
    c.data.augment = "none"  # flips and AutoAugment change what a digit means
    c.data.crop_scale = (0.6, 1.0)
    c.checkpoint.every_steps = 200
    c.log_every_steps = 50
    c.eval.every_steps = 0
    c.eval.calib_batches = 8
    c.eval.calib_batch_size = 64
    c.eval.batch_size = 64
    c.search.calib_batches = 8
    return c
