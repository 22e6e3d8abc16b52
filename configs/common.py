"""Shared config pieces: the sections every run has, with the reference's values (spec §6).

One field per line, with what it does or why it has this value. Hardware needs no preset:
`model.dtype='auto'` computes in bfloat16 on GPU/TPU and float32 on CPU, and `data.num_workers`
defaults to the host's cores (at most 16).
"""

import ml_collections

from alphanet_jax import data, search_config, search_space


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
    c.run = "train"  # comma-separated tasks: train, evaluate, search, export (launch.py --mode overrides)
    c.seed = 0  # parameters, subnets (from seed and step), dropout, data order
    c.space = ml_collections.ConfigDict(search_space.SPACES[space])

    c.data = data.default_config(data_source)
    c.data_prefetch = 2  # batches decoded ahead in a background thread (0: off)

    c.batch_size = 2048  # global, over all devices and hosts
    c.num_epochs = 360  # the reference's schedule, after the warm-up (spec §6.5)
    c.warmup_epochs = 5
    c.total_steps = -1  # > 0 overrides num_epochs
    c.warmup_steps = -1  # >= 0 overrides warmup_epochs

    # SGD as PyTorch's (spec §6.4): clip by value, then weight decay on kernels, then Nesterov momentum.
    c.optim = ml_collections.ConfigDict()
    c.optim.base_lr = 0.1  # per lr_batch_unit images: lr = base_lr x max(1, batch_size // lr_batch_unit)
    c.optim.lr_batch_unit = 256
    c.optim.warmup_start_factor = 0.001  # the warm-up multiplies the cosine by this at step 0, 1 at its end
    c.optim.momentum = 0.9
    c.optim.nesterov = True
    c.optim.weight_decay = 1e-5  # conv and linear kernels only, not BN affine or biases
    c.optim.grad_clip_value = 1.0  # element-wise, on the gradient summed over the sandwich's subnets

    # The sandwich rule with in-place distillation (spec §6.2-6.3).
    c.sandwich = ml_collections.ConfigDict()
    c.sandwich.num_arch_training = 4  # subnets per step: max, num_arch_training - 2 uniform random, min
    c.sandwich.distill = "alpha"  # the students' loss: alpha (adaptive alpha-divergence), kl (soft CE), none (labels)
    c.sandwich.alpha_min = -1.0  # the alpha-divergence's range of alpha
    c.sandwich.alpha_max = 1.0
    c.sandwich.iw_clip = 5.0  # clip of the alpha-divergence's importance weights
    c.sandwich.label_smoothing = 0.1  # the max subnet's cross-entropy with the labels
    c.sandwich.dropout = 0.2  # on the max subnet only
    c.sandwich.drop_connect = 0.2  # on the max subnet only
    c.sandwich.drop_connect_only_last_two_stages = True  # as the reference
    # The min subnet runs sliced at its own widths in a program of its own: the masked program's logits and
    # gradients at a fraction of its work. False: masked, in its resolution's program.
    c.sandwich.static_min = True

    # What the supernet computes in, and how; none of the speed options changes the result (tests compare).
    c.model = ml_collections.ConfigDict()
    c.model.dtype = "auto"  # auto: bfloat16 compute on GPU/TPU, float32 on CPU; parameters stay float32
    c.model.bn_eps = 1e-5
    c.model.sync_bn = False  # per-device BN statistics, as the reference's sync_bn: False
    # 'true' computes depth-inactive blocks not at all (scanned blocks: a loop over each stage's active blocks,
    # layers.prefix_scan; unscanned: lax.cond per block) instead of computing and discarding them; 'auto': on CPU
    # with scanned blocks only. On the 2-core CPU (AlphaNet, fp32, batch 8) the step measured 5 % faster but
    # compiled 50 % longer (benchmarks/RESULTS.md): off here (short runs, tests); configs/alphanet.py sets 'auto'.
    c.model.skip_inactive_blocks = "false"
    # Recomputes block activations in the backward pass (jax.checkpoint per block): less device memory for
    # about one extra forward per subnet; for large per-device batches.
    c.model.remat = False
    # What each block keeps for its backward pass (remat off): 'all' (every intermediate autodiff saves) or
    # 'convs' (convolution outputs, SE gate, BN statistics; BN/activations/masks recomputed elementwise);
    # auto: 'convs' on CPU (AlphaNet student ~20 % faster there, benchmarks/RESULTS.md), 'all' elsewhere.
    c.model.block_residuals = "auto"
    # auto ('taps' on CPU, 'xla' elsewhere), 'xla' (grouped convolution), 'shift' or 'taps' (k*k shifted
    # slices, autodiff or hand-written backward; see depthwise.depthwise).
    c.model.depthwise_impl = "auto"
    # auto (True on CPU, False elsewhere): each stage's same-shape blocks run as one lax.scan body, a smaller
    # program that compiles faster (supernet.forward).
    c.model.scan_blocks = "auto"
    # Ghost BN in training: statistics over each group of this many consecutive examples of a device's batch
    # (0: the whole per-device batch); calibration always uses whole batches.
    c.model.bn_group_size = 0

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # devices on the data axis (-1: all)

    # Multi-host start-up (mesh.initialize_distributed); all empty: one process.
    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = ""  # HOST:PORT of process 0, on GPU clusters
    c.distributed.num_processes = 0
    c.distributed.process_id = -1
    c.distributed.auto = False  # TPU pods, SLURM: jax finds the processes itself

    # Compile every program of the step (one per resolution, zeros, update) before the first step, instead
    # of as the steps first need them (in parallel threads on hosts with more than 2 cores).
    c.precompile = True
    # Persistent XLA compilation cache (alphanet_jax/compile_cache.py): a run whose programs an earlier run
    # compiled (a resume, a repeat, another task on the same checkpoint) loads them instead of compiling
    # (AlphaNet step on the 2-core CPU: 114 s compiled, 25.7 s loaded; benchmarks/RESULTS.md).
    # 'auto': $JAX_COMPILATION_CACHE_DIR, else ~/.cache/alphanet_jax/xla; 'none': off; or a directory (on
    # several hosts: one they all share).
    c.compile_cache = "auto"

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000  # also at the end and on SIGTERM
    c.checkpoint.keep = 3  # the newest ones
    c.checkpoint.async_save = True  # training goes on while Orbax writes

    c.log_every_steps = 50  # progress line and metrics; the host waits for the device there
    c.max_consecutive_bad_steps = 20  # stop when this many steps in a row had non-finite gradients
    # Multi-host runs exchange the processes' SIGTERM flags (a collective that waits for the device) every
    # this many steps, and at log, save and validation steps, where the host waits anyway; all processes
    # stop and save at the same step. 1: after every step (keeps no steps queued on the device).
    c.stop_check_every = 10

    # Validation of the min and max subnets during training, and the `evaluate` task.
    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 0  # during training (0: never)
    c.eval.at_end = True  # after training
    c.eval.calib_batches = 64  # BN calibration batches per subnet (spec §7)
    c.eval.calib_batch_size = 256  # training-transform images per calibration batch, global
    c.eval.calib_seed = 5  # which training images calibrate
    c.eval.batch_size = 256  # global
    c.eval.subnets = "a0,a1,a2,a3,a4,a5,a5_1,a6"  # what `evaluate` measures: presets or JSON files
    c.eval.checkpoint = ""  # the weights: this workdir (empty), another workdir, or a PyTorch .pth(.tar) file

    c.search = search_config.default_config()
    c.search.calib_batches = 32  # BN calibration batches per candidate

    c.export = ml_collections.ConfigDict()
    c.export.subnet = ""  # a preset name or JSON file, or
    c.export.max_mflops = 0.0  # the best searched subnet within this budget, or
    c.export.max_latency_ms = 0.0  # the most accurate searched subnet predicted within this many ms
    c.export.directory = ""  # empty: WORKDIR/export
    c.export.format = "flax"  # "onnx" also writes model.onnx (needs `pip install -e .[deploy]`)

    # --mode=latency: times the space's parts on this device and fits a predictor (latency_measure).
    c.latency = ml_collections.ConfigDict()
    c.latency.runtime = "xla"  # xla: jit on the default backend; onnxruntime: the exported graphs' parts
    c.latency.batch_size = 1
    c.latency.warmup = 3
    c.latency.repeats = 20  # runs per round of each part or subnet
    c.latency.rounds = 2  # rounds over all parts or subnets in turn
    c.latency.statistic = "median"  # of the samples; "min" is steadier on a machine shared with other work
    c.latency.fit_subnets = 10  # whole subnets measured to fit how the parts add up
    c.latency.validate_subnets = 30  # other subnets measured to validate the prediction
    c.latency.seed = 0
    c.latency.table = ""  # a table to search with (e.g. built on the target device); default DIR/latency/table.json
    return c


def digits_quickstart(space: str, steps: int) -> ml_collections.ConfigDict:
    """The whole pipeline on the bundled 8x8 digits, upsampled to 24x24, sized for a 2-core CPU."""
    c = base_config(space, "digits")
    c.run = "train,evaluate,search,export"  # the whole pipeline in one command
    c.model.dtype = "float32"  # the same numbers on any hardware
    c.batch_size = 64
    c.total_steps = steps  # digits has no epochs worth counting: ~1500 training images
    c.warmup_steps = 30
    c.optim.base_lr = 0.1  # batch 64 < lr_batch_unit: not scaled
    c.data.num_workers = 2  # the 2-core box it is sized for
    c.data.image_size = 24  # 8x8 digits upsampled
    c.data.resize_size = 28
    c.data.augment = "none"  # flips and AutoAugment change what a digit means
    c.data.crop_scale = (0.6, 1.0)  # crops that keep most of the digit
    c.checkpoint.every_steps = 200
    c.log_every_steps = 50
    c.eval.every_steps = 0  # only at the end
    c.eval.calib_batches = 8  # 512 images calibrate a tiny supernet
    c.eval.calib_batch_size = 64
    c.eval.batch_size = 64
    c.search.calib_batches = 8
    return c
