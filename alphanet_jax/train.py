"""Sandwich-rule supernet training with in-place alpha-divergence distillation (spec §6): the recipe
(learning rate, optimizer, model), the train state, BN calibration and evaluation, and the loop. The
step itself (its compiled programs) is `sandwich.SandwichStep`; the metric files are `metrics`.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from alphanet_jax import checkpoint as ckpt_lib
from alphanet_jax import compile_cache
from alphanet_jax.console import log
from alphanet_jax import data as data_lib
from alphanet_jax import errors
from alphanet_jax import evaluate as eval_lib
from alphanet_jax.files import atomic_write
from alphanet_jax import depthwise as depthwise_lib
from alphanet_jax import mesh as mesh_lib
from alphanet_jax import metrics as metrics_lib
from alphanet_jax.sampling import sandwich_subnets
from alphanet_jax.sandwich import SandwichStep, step_encodings
from alphanet_jax.search_space import SearchSpace, get_space
from alphanet_jax import supernet as supernet_lib
from alphanet_jax.subnet_encoding import encode
from alphanet_jax.supernet import Supernet

Array = jax.Array


TrainingError = errors.TrainingError  # training cannot go on (e.g. too many consecutive non-finite steps)


# ----------------------------------------------------------------------------
# Recipe pieces
# ----------------------------------------------------------------------------


def scaled_base_lr(config: ml_collections.ConfigDict) -> float:
    """base_lr x max(1, global_batch // lr_batch_unit) (spec §6.5)."""
    o = config.optim
    return o.base_lr * max(1, config.batch_size // o.lr_batch_unit)


def learning_rate_fn(config: ml_collections.ConfigDict, total_steps: int, warmup_steps: int
                     ) -> Callable[[Any], Array]:
    """The reference's per-iteration warm-up x cosine: lr(t) = base * w(t) * (1 + cos(pi t / T)) / 2.

    The warm-up factor w(t) = f + (1 - f) t / warmup *multiplies* a cosine that runs
    over all T iterations, warm-up included (spec §6.5).
    The cosine factor is evaluated as sin^2(pi (T - t) / 2T), which equals (1 + cos(pi t / T)) / 2
    but keeps full float32 relative precision at the end of training: 1 + cos(.) cancels to 0
    in float32 for t close to T (lr(224999) would be 0 instead of the reference's 3.9e-11).
    """
    base = scaled_base_lr(config)
    f = config.optim.warmup_start_factor

    def lr(t):
        t = jnp.asarray(t, jnp.float32)
        w = jnp.where(t < warmup_steps, f + (1.0 - f) * t / max(warmup_steps, 1), 1.0)
        return base * w * jnp.square(jnp.sin(jnp.pi * (total_steps - t) / (2.0 * total_steps)))

    return lr


def weight_decay_mask(params: Any) -> Any:
    """True for conv and linear weights (`kernel`), False for BN affine and biases (spec §6.4)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def make_optimizer(config: ml_collections.ConfigDict, lr: Callable) -> optax.GradientTransformation:
    """clip by value -> weight decay on kernels -> SGD Nesterov: PyTorch's order (spec §6.4)."""
    o = config.optim
    return optax.chain(
        optax.clip(o.grad_clip_value),
        optax.add_decayed_weights(o.weight_decay, mask=weight_decay_mask),
        optax.sgd(lr, momentum=o.momentum, nesterov=o.nesterov))


DTYPES = ("auto", "float32", "bfloat16")  # model.dtype


def compute_dtype(name: str) -> Any:
    """'float32', 'bfloat16', or 'auto' (bfloat16 on GPU/TPU, float32 on CPU)."""
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
    if name in ("float32", "bfloat16"):
        return jnp.dtype(name)
    raise errors.ConfigError(f"model.dtype must be one of {DTYPES}, got {name!r}")


def make_model(config: ml_collections.ConfigDict, space: SearchSpace, for_training: bool = True) -> Supernet:
    """The supernet of a run. `for_training=False` (BN calibration, evaluation, search, export): BN
    statistics over the whole per-device batch, as the reference calibrates (no sync_bn, no ghost BN)."""
    m = config.model
    scan = supernet_lib.resolve_scan_blocks(m.scan_blocks)
    if m.depthwise_impl not in depthwise_lib.DEPTHWISE_IMPLS:
        raise errors.ConfigError(f"model.depthwise_impl must be one of {depthwise_lib.DEPTHWISE_IMPLS}, got "
                                 f"{m.depthwise_impl!r}")
    if for_training:
        check_bn_group_size(config)
    return Supernet(space=space, dtype=compute_dtype(m.dtype), bn_eps=m.bn_eps,
                    bn_axis_name=mesh_lib.DATA if (for_training and m.sync_bn) else None,
                    drop_connect_only_last_two_stages=config.sandwich.drop_connect_only_last_two_stages,
                    skip_inactive=supernet_lib.resolve_skip_inactive(m.skip_inactive_blocks, scan),
                    remat=m.remat, block_residuals=m.get("block_residuals", "auto"),
                    depthwise_impl=m.depthwise_impl, scan_blocks=scan,
                    bn_group_size=int(m.get("bn_group_size", 0)) if for_training else 0)


def check_bn_group_size(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """ConfigError unless model.bn_group_size (ghost BN) fits: an integer >= 0, not with sync_bn, and
    (given the device count) dividing the per-device batch batch_size / num_devices."""
    m = config.model
    g = m.get("bn_group_size", 0)
    if not isinstance(g, int) or isinstance(g, bool) or g < 0:
        raise errors.ConfigError(f"model.bn_group_size = {g!r} is not allowed: it must be an integer >= 0 "
                                 f"(0: BN over the whole per-device batch)")
    if g == 0:
        return
    if m.sync_bn:
        raise errors.ConfigError(f"model.bn_group_size = {g} with model.sync_bn = True: ghost BN groups are per "
                                 f"device, sync_bn averages over all devices; set one of them off "
                                 f"(--config.model.bn_group_size=0 or --config.model.sync_bn=False)")
    if num_devices is None:
        # Whatever the device count, the per-device batch divides the global one.
        if config.batch_size % g:
            raise errors.ConfigError(f"batch_size = {config.batch_size} is not divisible by model.bn_group_size = "
                                     f"{g}: no per-device batch can be split into BN groups of {g}")
        return
    per_device = config.batch_size // num_devices
    if config.batch_size % num_devices == 0 and per_device % g:
        raise errors.ConfigError(f"the per-device batch {per_device} (batch_size {config.batch_size} / "
                                 f"{num_devices} devices) is not divisible by model.bn_group_size = {g}: use a "
                                 f"group size that divides {per_device}, or 0 (BN over the whole per-device batch)")


# ----------------------------------------------------------------------------
# State
# ----------------------------------------------------------------------------


def init_state(model: Supernet, tx: optax.GradientTransformation, seed: int) -> dict:
    """{step, params, batch_stats, opt_state, bad_streak}: a plain dict, big_vision style."""
    space = model.space
    r = min(space.resolutions)
    variables = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, r, r, space.in_channels)), space.min_subnet())
    params = variables["params"]
    return {"step": jnp.zeros((), jnp.int32), "params": params, "batch_stats": variables["batch_stats"],
            "opt_state": tx.init(params), "bad_streak": jnp.zeros((), jnp.int32),
            "worst_streak": jnp.zeros((), jnp.int32),
            "skipped": jnp.zeros((), jnp.int32)}


def create_state(model: Supernet, tx: optax.GradientTransformation, seed: int, mesh) -> tuple[dict, Any]:
    """The train state created directly replicated on the mesh (shapes via eval_shape)."""
    abstract = jax.eval_shape(functools.partial(init_state, model, tx, seed))
    shardings = jax.tree.map(lambda _: mesh_lib.replicated(mesh), abstract)
    state = jax.jit(functools.partial(init_state, model, tx, seed), out_shardings=shardings)()
    return state, shardings


def abstract_state(model: Supernet, tx: optax.GradientTransformation, mesh) -> Any:
    abstract = jax.eval_shape(functools.partial(init_state, model, tx, 0))
    rep = mesh_lib.replicated(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), abstract)


# ----------------------------------------------------------------------------
# BN calibration and evaluation (during training, and the evaluate / search / export tasks)
# ----------------------------------------------------------------------------


def eval_iterators(config: ml_collections.ConfigDict, local: bool = False) -> tuple[Callable, Callable]:
    """Factories of fresh (calibration, evaluation) iterators with the `eval` section's batch sizes and
    seed: each host reads its share of the global batches, or (`local`) the whole of them, for an
    evaluation on this host's devices alone."""
    e = config.eval
    pi, pc = (0, 1) if local else (jax.process_index(), jax.process_count())

    def calib():
        return data_lib.make_calibration_iterator(config.data, batch_size=e.calib_batch_size // pc,
                                                  seed=e.calib_seed, process_index=pi, process_count=pc)

    def evals():
        return data_lib.make_eval_iterator(config.data, batch_size=e.batch_size // pc, process_index=pi,
                                           process_count=pc)

    return calib, evals


def calibrate_and_evaluate(config, model_eval: Supernet, variables: dict, mesh,
                           subnets: Sequence[tuple[str, Any]]) -> list[dict]:
    """BN calibration on `eval.calib_batches` batches, then evaluation, of each named subnet (spec §6.6);
    returns one row per (name, subnet), with its name."""
    calib, evals = eval_iterators(config)
    return [dict(eval_lib.calibrate_and_evaluate(model_eval, variables, subnet, calib(), evals(), mesh=mesh,
                                                 num_calib_batches=config.eval.calib_batches), name=name)
            for name, subnet in subnets]


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------


def itstime(done: int, every: int, total: int, last: bool = True) -> bool:
    """Whether a periodic action runs after `done` of `total` steps: every `every` steps (0: never) before
    the last one, and after the last one if `last` (big_vision's `itstime`)."""
    if done == total:
        return last
    return every > 0 and done % every == 0


def stop_check_due(config: ml_collections.ConfigDict, done: int, total: int, process_count: int,
                   host_waits: bool) -> bool:
    """Whether the processes exchange their stop flags (SIGTERM) after `done` steps.

    The exchange waits for the device to finish the step, so a multi-host run does it only every
    `stop_check_every` steps, after the last one, and where the host waits anyway (`host_waits`: a
    log, save or validation step); the answer depends on nothing a process sees alone, so all
    processes exchange at the same steps and stop at the same one. A single process reads its own
    flag after every step (no exchange, no wait)."""
    return process_count == 1 or host_waits or itstime(done, config.stop_check_every, total)


def resolve_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> tuple[int, int]:
    """(total_steps, warmup_steps) from epochs or explicit steps."""
    total = config.total_steps if config.total_steps > 0 else config.num_epochs * steps_per_epoch
    warm = config.warmup_steps if config.warmup_steps >= 0 else config.warmup_epochs * steps_per_epoch
    if total < 1:
        raise errors.ConfigError(f"training would run {total} steps: set num_epochs or total_steps "
                                 f"(steps per epoch = {steps_per_epoch})")
    return int(total), int(warm)


def checkpoint_meta(config: ml_collections.ConfigDict, space: SearchSpace) -> dict:
    return {"space": space.to_dict(), "config": json.loads(config.to_json_best_effort())}


def restore_variables(config: ml_collections.ConfigDict, workdir: str, mesh=None) -> tuple[dict, int]:
    """Supernet variables {params, batch_stats} of the newest checkpoint in `workdir`."""
    space = get_space(config.space)
    mesh = mesh or mesh_lib.make_mesh(-1)
    model = make_model(config, space, for_training=False)  # the variables' shapes only
    tx = make_optimizer(config, lambda t: 0.0)
    ckdir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckdir):
        raise errors.PathNotFoundError(f"no checkpoint in {ckdir}: train first (python launch.py --config=... "
                                       f"--workdir={workdir}) or set --config.eval.checkpoint")
    ck = ckpt_lib.Checkpointer(ckdir, keep=config.checkpoint.keep, read_only=True)
    try:
        # Evaluation only reads: a damaged checkpoint is skipped (one line), not moved.
        found = ck.restore_newest(abstract_state(model, tx, mesh), checkpoint_meta(config, space), move_aside=False)
        if found is None:
            raise errors.PathNotFoundError(f"no usable checkpoint in {workdir}/checkpoints: train first "
                                           f"(python launch.py --config=... --workdir={workdir})")
        step, state, _, _ = found
    finally:
        ck.close()
    return {"params": state["params"], "batch_stats": state["batch_stats"]}, step


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains the supernet in `workdir`, resuming from its newest checkpoint; returns final metrics."""
    space, mesh, host_bs, info = _set_up_run(config, workdir)
    pi, pc = jax.process_index(), jax.process_count()
    is_main = pi == 0

    model = make_model(config, space)
    steps_per_epoch = _steps_per_epoch(config, host_bs, pi, pc)
    total_steps, warmup_steps = resolve_schedule(config, steps_per_epoch)
    lr = learning_rate_fn(config, total_steps, warmup_steps)
    tx = make_optimizer(config, lr)
    meta = checkpoint_meta(config, space)
    # Opened once the schedule and batch size are accepted: a rejected one leaves no Orbax thread behind.
    ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                               async_save=config.checkpoint.async_save)
    state, data_state = _restore_or_create(config, workdir, ck, model, tx, mesh, meta)
    first_step = int(jax.device_get(state["step"]))
    batches = _train_batches(config, host_bs, pi, pc, data_state)
    step_fn = SandwichStep(model, tx, config, mesh)
    writer = metrics_lib.MetricWriter(workdir, is_main, resume_step=first_step)
    model_eval = make_model(config, space, for_training=False)

    stop = {"signal": None}
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: stop.update(signal=sig))
    log(f"training {space.name!r} supernet: {total_steps} steps ({steps_per_epoch}/epoch), global batch "
        f"{config.batch_size} on {mesh.devices.size} devices x {pc} processes, start at step {first_step}")
    base_key = jax.random.PRNGKey(config.seed)
    summary: dict[str, Any] = {}
    last_metrics: dict[str, float] = {}
    t_last, n_last = time.perf_counter(), 0
    compiled_after_warmup = None
    interrupted = False
    try:
        for step in range(first_step, total_steps):
            batch = mesh_lib.to_global(next(batches), mesh)
            subnets = sandwich_subnets(space, config.seed, step, config.sandwich.num_arch_training)
            encs = [encode(s, space) for s in subnets]
            rng = jax.random.fold_in(base_key, step)
            if step == first_step and config.precompile:
                _precompile(step_fn, state, batch, space, rng)
            state, metrics = step_fn(state, batch, encs, rng)
            n_last += 1
            done = step + 1
            log_now = itstime(done, config.log_every_steps, total_steps)
            eval_now = itstime(done, config.eval.every_steps, total_steps, last=False) and info["num_val"] > 0
            save_now = itstime(done, config.checkpoint.every_steps, total_steps)
            if log_now:
                last_metrics, t_last = _log_step(config, metrics, state, step_fn, lr, step, total_steps, t_last,
                                                 n_last, writer, ck)
                n_last = 0
                if done >= config.log_every_steps * 3 and compiled_after_warmup is None:
                    compiled_after_warmup = step_fn.num_compiled()
            if eval_now:
                _evaluate_and_log(config, model_eval, state, mesh, space, writer, done)
            # Every process must stop (and save) at the same step: SIGTERM may reach the hosts of a
            # multi-host run at different steps, or only some of them.
            if stop_check_due(config, done, total_steps, pc, host_waits=log_now or eval_now or save_now):
                interrupted = mesh_lib.any_process(stop["signal"] is not None)
            if save_now or interrupted:
                _check_bad_streak(config, state, ck)  # never save a run that has stopped
                ck.save(done, state, batches.get_state(), meta)
            if interrupted:
                log(f"SIGTERM: saved step {done}, exiting")
                break
        ck.wait()
        summary = dict(last_metrics, steps=int(state["step"]), compiled_programs=step_fn.num_compiled(),
                       compiled_after_warmup=compiled_after_warmup)
        if not interrupted and config.eval.at_end and info["num_val"] > 0:
            summary["eval"] = _evaluate_and_log(config, model_eval, state, mesh, space, writer, total_steps)
    finally:
        signal.signal(signal.SIGTERM, previous)
        ck.close()
        writer.close()
        if hasattr(batches, "close"):
            batches.close()
    summary["state"] = state
    summary["interrupted"] = interrupted
    return summary


def _set_up_run(config: ml_collections.ConfigDict, workdir: str) -> tuple[SearchSpace, Any, int, dict]:
    """(search space, mesh, per-host batch size, dataset info) of a training run, checked; process 0
    writes the config into `workdir`."""
    mesh_lib.initialize_distributed(config.distributed)
    space = get_space(config.space)
    mesh = mesh_lib.make_mesh(config.mesh.data)
    host_bs = mesh_lib.host_batch_size(config.batch_size, mesh)
    check_bn_group_size(config, mesh.devices.size)
    info = data_lib.dataset_info(config.data)
    if info["num_classes"] != space.num_classes:
        raise errors.ConfigError(f"the dataset has {info['num_classes']} classes but the search space "
                                 f"{space.name!r} has num_classes={space.num_classes}; set config.space.num_classes")
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        atomic_write(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=1))
    return space, mesh, host_bs, info


def _steps_per_epoch(config: ml_collections.ConfigDict, host_bs: int, pi: int, pc: int) -> int:
    """Steps per epoch, from the iterator (whole batches per host)."""
    probe = data_lib.make_train_iterator(config.data, batch_size=host_bs, seed=config.seed, process_index=pi,
                                         process_count=pc)
    return probe.steps_per_epoch


def _train_batches(config: ml_collections.ConfigDict, host_bs: int, pi: int, pc: int, data_state: Any):
    """This host's training batches from `data_state` (None: the start), prefetched if data_prefetch > 0."""
    it = data_lib.make_train_iterator(config.data, batch_size=host_bs, seed=config.seed, process_index=pi,
                                      process_count=pc, state=data_state)
    return data_lib.prefetch(it, config.data_prefetch) if config.data_prefetch > 0 else it


def _restore_or_create(config: ml_collections.ConfigDict, workdir: str, ck: ckpt_lib.Checkpointer,
                       model: Supernet, tx: optax.GradientTransformation, mesh, meta: dict) -> tuple[dict, Any]:
    """(train state, data iterator state or None): the newest checkpoint's, else a new state."""
    found = ck.restore_newest(abstract_state(model, tx, mesh), meta, log=log)
    if found is not None:
        start, state, data_state, _ = found
        log(f"resumed from {workdir}/checkpoints/{start}")
        return state, data_state
    state, _ = create_state(model, tx, config.seed, mesh)
    return state, None


def _precompile(step_fn: SandwichStep, state: dict, batch: dict, space: SearchSpace, rng: Array) -> None:
    """Compiles every program of a step before the first one runs, and logs how long it took."""
    t_compile = time.perf_counter()
    with compile_cache.count_hits() as cached:
        secs = step_fn.precompile(state, batch, step_encodings(space), rng)
    loaded = f"{cached['hits']} loaded from the compilation cache; " if cached["hits"] else ""
    log(f"compiled {len(secs)} programs in {time.perf_counter() - t_compile:.1f} s "
        f"({loaded}slowest: {max(secs, key=secs.get)}, {max(secs.values()):.1f} s)")


def _log_step(config: ml_collections.ConfigDict, metrics: dict, state: dict, step_fn: SandwichStep, lr: Callable,
              step: int, total_steps: int, t_last: float, n_last: int, writer: metrics_lib.MetricWriter,
              ck: ckpt_lib.Checkpointer) -> tuple[dict[str, float], float]:
    """Writes and prints a log step's scalars: the step's metrics (read from the device, which waits for
    it), the learning rate, and the mean step time over the `n_last` steps since `t_last`; then checks
    the bad-step streak. Returns (the scalars, the time the next interval starts)."""
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    dt = (time.perf_counter() - t_last) / n_last
    m.update(lr=float(lr(step)), step_time=dt, images_per_sec=config.batch_size / dt,
             skipped=int(state["skipped"]), compiled_programs=step_fn.num_compiled())
    t_next = time.perf_counter()
    done = step + 1
    writer.write(done, m)
    log(metrics_lib.fmt_progress(done, total_steps, m))
    _check_bad_streak(config, state, ck)
    return m, t_next


def _check_bad_streak(config: ml_collections.ConfigDict, state: dict, ck: ckpt_lib.Checkpointer) -> None:
    """Raises TrainingError once `max_consecutive_bad_steps` steps in a row were non-finite.

    The update program stops changing the state on the device at that step (no per-step host
    sync); this reads its flag at log and save steps.
    """
    streak = int(state["worst_streak"])  # the longest run of bad steps so far
    if streak >= config.max_consecutive_bad_steps:
        raise TrainingError(
            f"{streak} consecutive steps had non-finite gradients (the run stopped at step {int(state['step'])}); "
            f"their updates were skipped. Lower optim.base_lr or check the data; the last checkpoint "
            f"(step {ck.latest_step()}) holds only finite values")


def _evaluate_and_log(config, model_eval, state, mesh, space, writer, step) -> dict:
    """Calibrates and evaluates the min and max subnets; logs and returns {name: row}."""
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    rows = {r["name"]: r for r in calibrate_and_evaluate(config, model_eval, variables, mesh,
                                                        [("min", space.min_subnet()), ("max", space.max_subnet())])}
    writer.write(step, {f"val/{k}/top1": r["top1"] for k, r in rows.items()} |
                 {f"val/{k}/top5": r["top5"] for k, r in rows.items()})
    log(" | ".join(f"val {k}: top-1 {r['top1']:.2f}% top-5 {r['top5']:.2f}% ({r['mflops']:.1f} MFLOPs)"
                   for k, r in rows.items()))
    return rows
