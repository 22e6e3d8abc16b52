"""Sandwich-rule supernet training with in-place alpha-divergence distillation (spec §6).

One step: the max subnet (dropout and drop-connect on) learns from labels with
label-smoothed CE; its logits, without gradient, teach `num_arch_training - 2`
uniform random subnets and the min subnet; gradients add up over the subnets,
are clipped element-wise, and one SGD (Nesterov) update follows.

Compiled programs: one per resolution for the subnets' forward + backward (the
architecture, and whether it is the max subnet, enter as arrays, so every subnet of a
resolution shares it), one for the min subnet run sliced at its own widths (it is the same
network every step), one for the update (which also makes the next step's zero gradient
accumulator): at most `len(resolutions) + 2`, whatever the subnets.
BN statistics are per device (the reference's `sync_bn: False`) by running the
forward inside `shard_map`; `model.sync_bn=True` averages them over all devices.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from alphanet_jax import checkpoint as ckpt_lib
from alphanet_jax.console import log
from alphanet_jax import data as data_lib
from alphanet_jax import errors
from alphanet_jax import evaluate as eval_lib
from alphanet_jax import export as export_lib
from alphanet_jax.files import atomic_write
from alphanet_jax import layers
from alphanet_jax import losses
from alphanet_jax import mesh as mesh_lib
from alphanet_jax.sampling import sandwich_subnets
from alphanet_jax.search_space import SearchSpace, get_space
from alphanet_jax import supernet as supernet_lib
from alphanet_jax.supernet import EncodedSubnet, Supernet, encode

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
DISTILL_LOSSES = ("alpha", "kl", "none")  # sandwich.distill


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
    if m.depthwise_impl not in layers.DEPTHWISE_IMPLS:
        raise errors.ConfigError(f"model.depthwise_impl must be one of {layers.DEPTHWISE_IMPLS}, got "
                                 f"{m.depthwise_impl!r}")
    if for_training:
        check_bn_group_size(config)
    return Supernet(space=space, dtype=compute_dtype(m.dtype), bn_eps=m.bn_eps,
                    bn_axis_name=mesh_lib.DATA if (for_training and m.sync_bn) else None,
                    drop_connect_only_last_two_stages=config.sandwich.drop_connect_only_last_two_stages,
                    skip_inactive=supernet_lib.resolve_skip_inactive(m.skip_inactive_blocks, scan),
                    remat=m.remat, depthwise_impl=m.depthwise_impl, scan_blocks=scan,
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


def distill_loss_fn(config: ml_collections.ConfigDict) -> Callable[[Array, Array, Array], Array]:
    """Per-example loss of a student given (logits, teacher logits, labels)."""
    s = config.sandwich
    if s.distill == "alpha":
        return lambda z, t, y: losses.adaptive_alpha_divergence(z, t, s.alpha_min, s.alpha_max, s.iw_clip)
    if s.distill == "kl":
        return lambda z, t, y: losses.soft_cross_entropy(z, t)
    if s.distill == "none":
        return lambda z, t, y: losses.label_smoothed_cross_entropy(z, y, s.label_smoothing)
    raise errors.ConfigError(f"sandwich.distill must be one of {DISTILL_LOSSES}, got {s.distill!r}")


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
# The sandwich step
# ----------------------------------------------------------------------------


class SandwichStep:
    """Compiled pieces of one sandwich step; `__call__` runs a whole step without host sync."""

    def __init__(self, model: Supernet, tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
                 mesh):
        self.model, self.tx, self.mesh = model, tx, mesh
        s = config.sandwich
        self.dropout, self.drop_connect = float(s.dropout), float(s.drop_connect)
        self.smoothing = float(s.label_smoothing)
        self.distill = distill_loss_fn(config)
        self.clip = float(config.optim.grad_clip_value)
        self.max_bad = int(config.max_consecutive_bad_steps)
        donate = jax.default_backend() != "cpu"  # CPU ignores donation (and warns)
        self.subnet_fn = jax.jit(self._subnet, donate_argnums=(2,) if donate else ())
        self.update_fn = jax.jit(self._update, donate_argnums=(0, 1) if donate else ())
        # The min subnet is the same network every step: it runs sliced, at its own widths (a
        # fraction of the masked program's work), in a program of its own (`_min_subnet`).
        space = model.space
        self.min_config = space.min_subnet()
        self.min_encoding = encode(self.min_config, space)
        self.static_min = bool(config.sandwich.static_min)
        self.min_model = export_lib.StaticSubnet(
            space=space, subnet=self.min_config, dtype=model.dtype, bn_eps=model.bn_eps,
            depthwise_impl=model.depthwise_impl, bn_axis_name=model.bn_axis_name, bn_group_size=model.bn_group_size)
        self.min_fn = jax.jit(self._min_subnet, donate_argnums=(2,) if donate else ())
        # The max subnet's gradient accumulator: zeros made by the previous update (None before
        # the first step: then made on the host, which compiles nothing).
        self._zero_grads = None

    def _subnet(self, params, batch_stats, grads, images, labels, teacher, enc, rng, is_max):
        """One subnet's forward + backward on the local batch; its gradient is added to `grads`.

        `is_max` (traced): the max subnet learns from the labels (label-smoothed CE) with dropout
        and drop-connect; the others from `teacher` (distillation) without. A rate of 0 is
        exactly the identity (keep probability 1, division by 1), so the max subnet shares the
        program of its resolution: one program fewer to compile than a separate teacher program.
        Returns (grads + this subnet's gradient, its logits without gradient, {loss, acc}).
        """
        model = self.model

        def per_device(params, batch_stats, images, labels, teacher, enc, rng, is_max):
            rngs = {"dropout": jax.random.fold_in(rng, jax.lax.axis_index(mesh_lib.DATA))}
            logits = model.apply({"params": params, "batch_stats": batch_stats}, images, enc, train=True,
                                 dropout_rate=jnp.where(is_max, self.dropout, 0.0),
                                 drop_connect_rate=jnp.where(is_max, self.drop_connect, 0.0), rngs=rngs)
            per_example = jax.lax.cond(
                is_max, lambda z, t, y: losses.label_smoothed_cross_entropy(z, y, self.smoothing), self.distill,
                logits, teacher, labels)
            return self._loss_metrics(per_example, logits, labels)

        d = P(mesh_lib.DATA)
        fwd = jax.shard_map(per_device, mesh=self.mesh, in_specs=(P(), P(), d, d, d, P(), P(), P()),
                            out_specs=(P(), P(), d))
        return self._accumulate(lambda p: fwd(p, batch_stats, images, labels, teacher, enc, rng, is_max),
                                params, grads)

    def _min_subnet(self, params, batch_stats, grads, images, labels, teacher):
        """`_subnet` for the min subnet, run as the static (sliced) network: the same logits and
        gradient as the masked program (the sliced weights' gradients land in the supernet's
        tensors, zero elsewhere), at the min subnet's widths instead of the max's."""
        space, subnet, static = self.model.space, self.min_config, self.min_model

        def per_device(params, batch_stats, images, labels, teacher):
            sliced = export_lib.slice_variables({"params": params, "batch_stats": batch_stats}, subnet, space)
            logits = static.apply(sliced, images, train=True)
            return self._loss_metrics(self.distill(logits, teacher, labels), logits, labels)

        d = P(mesh_lib.DATA)
        fwd = jax.shard_map(per_device, mesh=self.mesh, in_specs=(P(), P(), d, d, d), out_specs=(P(), P(), d))
        return self._accumulate(lambda p: fwd(p, batch_stats, images, labels, teacher), params, grads)

    @staticmethod
    def _loss_metrics(per_example: Array, logits: Array, labels: Array) -> tuple[Array, Array, Array]:
        """(mean loss, top-1 accuracy) over all devices, and the local logits (inside shard_map)."""
        loss = jnp.mean(per_example)
        acc = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
        return jax.lax.pmean(loss, mesh_lib.DATA), jax.lax.pmean(acc, mesh_lib.DATA), logits

    @staticmethod
    def _accumulate(fwd: Callable, params: Any, grads: Any) -> tuple[Any, Array, dict]:
        """(grads + d loss / d params, the logits without gradient, {loss, acc}) of `fwd(params)`."""
        def loss(p):
            l, acc, logits = fwd(p)
            return l, (acc, logits)

        (l, (acc, logits)), g = jax.value_and_grad(loss, has_aux=True)(params)
        return jax.tree.map(jnp.add, grads, g), jax.lax.stop_gradient(logits), {"loss": l, "acc": acc}

    def _take_zero_grads(self, params: Any) -> Any:
        """The max subnet's gradient accumulator: the zeros the last update made, else zeros from the host.

        Host zeros (`make_array_from_callback`) compile nothing, so the step stays at
        `len(resolutions) + 2` programs; on accelerators the accumulator is donated, so each is used once.
        """
        zeros, self._zero_grads = self._zero_grads, None
        if zeros is None:
            rep = mesh_lib.replicated(self.mesh)
            zeros = jax.tree.map(lambda a: jax.make_array_from_callback(
                a.shape, rep, lambda idx, a=a: np.zeros(a.shape, a.dtype)[idx]), params)
        return zeros

    def _zero_teacher(self, labels: Array) -> Array:
        """Zero logits in the teacher's place for the max subnet (it learns from labels; never read)."""
        shape = labels.shape + (self.model.space.num_classes,)
        return jax.make_array_from_callback(shape, mesh_lib.batch_sharding(self.mesh),
                                            lambda idx: np.zeros(shape, np.float32)[idx])

    def max_subnet(self, params, batch_stats, images, labels, enc, rng) -> tuple[Any, Array, dict]:
        """The max subnet's step: (its gradient, its logits (the students' teacher), {loss, acc})."""
        return self.subnet_fn(params, batch_stats, self._take_zero_grads(params), images, labels,
                              self._zero_teacher(labels), enc, rng, np.bool_(True))

    def student(self, params, batch_stats, grads, images, labels, teacher, enc, rng) -> tuple[Any, dict]:
        """A student's step: (grads + its gradient, {loss, acc}); at rates 0 the result does not depend on `rng`.

        The min subnet runs in its static program (`_min_subnet`) unless `sandwich.static_min` is off.
        """
        if self.static_min and self.is_min(enc):
            grads, _, m = self.min_fn(params, batch_stats, grads, images, labels, teacher)
        else:
            grads, _, m = self.subnet_fn(params, batch_stats, grads, images, labels, teacher, enc, rng,
                                         np.bool_(False))
        return grads, m

    def is_min(self, enc: EncodedSubnet) -> bool:
        """Whether `enc` is the space's min subnet (host arrays, as `encode` makes them)."""
        mine = self.min_encoding
        return enc.resolution == mine.resolution and all(
            np.array_equal(np.asarray(a), b) for a, b in zip(jax.tree.leaves(enc), jax.tree.leaves(mine)))

    def _update(self, state, grads):
        # The statistics on one concatenated vector: per-leaf reductions made this program ~3x
        # slower to compile (hundreds of tiny kernels; 469 leaves for AlphaNet).
        flat = jnp.concatenate([jnp.ravel(g).astype(jnp.float32) for g in jax.tree.leaves(grads)])
        finite = jnp.all(jnp.isfinite(flat))
        grad_norm = jnp.sqrt(jnp.sum(jnp.square(flat)))
        clipped = jnp.sum(jnp.abs(flat) > self.clip, dtype=jnp.int32) / flat.size
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        # A skipped step keeps params and momentum but advances optax's step counts, so that the
        # schedule stays lr(state.step) (the lr that is logged), however many steps were skipped.
        opt_state = jax.tree_util.tree_map_with_path(
            lambda path, a, b: a if getattr(path[-1], "name", None) == "count" else jnp.where(finite, a, b),
            opt_state, state["opt_state"])
        new = dict(state, step=state["step"] + 1,
                   params=jax.tree.map(lambda a, b: jnp.where(finite, a, b), params, state["params"]),
                   opt_state=opt_state, bad_streak=jnp.where(finite, 0, state["bad_streak"] + 1),
                   worst_streak=jnp.maximum(state["worst_streak"], jnp.where(finite, 0, state["bad_streak"] + 1)),
                   skipped=state["skipped"] + jnp.where(finite, 0, 1))
        # After max_consecutive_bad_steps bad steps in a row nothing changes any more (checked here every
        # step, on the device); the host sees it at the next log or save step and stops the run.
        halted = state["worst_streak"] >= self.max_bad
        new = jax.tree.map(lambda a, b: jnp.where(halted, b, a), new, state)
        # The next step's gradient accumulator (in the donated gradients' buffers on accelerators).
        zeros = jax.tree.map(jnp.zeros_like, grads)
        return new, {"grad_norm": grad_norm, "clip_fraction": clipped, "finite": finite}, zeros

    def __call__(self, state: dict, batch: Mapping[str, Array], encs: list[EncodedSubnet], rng: Array
                 ) -> tuple[dict, dict]:
        images, labels = batch["image"], batch["label"]
        params, bs = state["params"], state["batch_stats"]
        grads, teacher, m = self.max_subnet(params, bs, images, labels, encs[0], rng)
        metrics = {"max/loss": m["loss"], "max/acc": m["acc"]}
        for i, enc in enumerate(encs[1:], start=1):
            grads, m = self.student(params, bs, grads, images, labels, teacher, enc, rng)
            role = "min" if i == len(encs) - 1 else f"random{i}"
            metrics[f"{role}/loss"], metrics[f"{role}/acc"] = m["loss"], m["acc"]
        state, m, self._zero_grads = self.update_fn(state, grads)
        metrics.update(m)
        return state, metrics

    def num_compiled(self) -> int:
        return self.subnet_fn._cache_size() + self.min_fn._cache_size() + self.update_fn._cache_size()

    def lowerings(self, state: dict, batch: Mapping[str, Array], encs: Mapping[Any, EncodedSubnet], rng: Array
                  ) -> dict[str, Callable[[], Any]]:
        """{program name: () -> jax.stages.Lowered} for every program a step can run.

        `encs` maps 'max' to the max subnet's encoding and each resolution to any subnet of
        it. Arguments mirror `__call__`'s exactly (shardings included), so compiling these
        fills the same cache that later calls use.
        """
        params, bs = state["params"], state["batch_stats"]
        images, labels = batch["image"], batch["label"]
        rep, shard = mesh_lib.replicated(self.mesh), mesh_lib.batch_sharding(self.mesh)
        grads = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), params)
        teacher = jax.ShapeDtypeStruct(labels.shape + (self.model.space.num_classes,), jnp.float32, sharding=shard)
        out = {}
        for r, enc in encs.items():
            if r != "max":  # the max subnet runs in the program of its resolution
                name = f"subnets @ {r}" + (" (and max)" if r == encs["max"].resolution else "")
                out[name] = functools.partial(self.subnet_fn.lower, params, bs, grads, images, labels, teacher, enc,
                                              rng, np.bool_(False))
        if self.static_min:
            out[f"min subnet @ {self.min_config.resolution} (static)"] = functools.partial(
                self.min_fn.lower, params, bs, grads, images, labels, teacher)
        out["update"] = lambda: self.update_fn.lower(state, grads)
        return out

    def precompile(self, state: dict, batch: Mapping[str, Array], encs: Mapping[Any, EncodedSubnet], rng: Array,
                   max_workers: int | None = None) -> dict[str, float]:
        """Compiles every program of a step concurrently; returns seconds per program.

        With enough cores XLA compiles in parallel threads, so the `len(resolutions) + 2` programs
        take about as long as the slowest one instead of their sum; later steps reuse the
        executables. On 2 cores concurrent compiles slow each other down more than they overlap
        (AlphaNet, batch 8: 222 s in 2 threads vs 199 s one after the other, benchmarks/RESULTS.md),
        so there the default is one thread.
        """
        from concurrent.futures import ThreadPoolExecutor

        def build(item):
            name, lower = item
            t = time.perf_counter()
            lower().compile()
            return name, time.perf_counter() - t

        items = list(self.lowerings(state, batch, encs, rng).items())
        cores = os.cpu_count() or 1
        workers = max_workers or (1 if cores <= 2 else min(len(items), cores))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return dict(pool.map(build, items))


def step_encodings(space: SearchSpace) -> dict[Any, EncodedSubnet]:
    """{'max': the max subnet, r: a subnet at resolution r for each r}: one of each program's inputs."""
    encs: dict[Any, EncodedSubnet] = {"max": encode(space.max_subnet(), space)}
    for r in space.resolutions:
        encs[r] = encode(space.min_subnet().replace(resolution=r), space)
    return encs


# ----------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------


class MetricWriter:
    """TensorBoard event files (process 0 only) plus a JSON-lines copy for scripts."""

    def __init__(self, workdir: str, enabled: bool, resume_step: int = 0):
        """`resume_step`: the step the run (re)starts from. Rows of later steps, written before a
        crash and lost with it, are dropped from metrics.jsonl and purged from TensorBoard, so each
        step appears once."""
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, "metrics.jsonl")
            _drop_rows_after(path, resume_step)
            tb_dir = os.path.join(workdir, "tensorboard")
            try:
                from tensorboardX import SummaryWriter
                # TensorBoard hides the events of steps >= purge_step from earlier event files.
                purge = resume_step + 1 if os.path.isdir(tb_dir) and os.listdir(tb_dir) else None
                self._tb = SummaryWriter(tb_dir, purge_step=purge)
            except ImportError:  # pragma: no cover
                logging.warning("tensorboardX is not installed: writing metrics.jsonl only")
            self._jsonl = open(path, "a")

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        self._jsonl.write(json.dumps({"step": step, **{k: float(v) for k, v in scalars.items()}}) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()


def _drop_rows_after(path: str, step: int) -> None:
    """Rewrites the JSON-lines file `path` without its rows of steps after `step` (atomically); the
    dropped lines are appended to `path`.dropped, never lost."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.read().splitlines()
    keep, dropped = [], []
    for line in lines:
        try:
            row_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):  # a line cut by a crash
            row_step = None
        (keep if row_step is not None and row_step <= step else dropped).append(line)
    if not dropped:
        return
    logging.warning("%s: dropping %d rows after step %d (steps lost when the run stopped; kept in %s.dropped)",
                    path, len(dropped), step, path)
    with open(path + ".dropped", "a") as f:
        f.write("".join(line + "\n" for line in dropped))
    atomic_write(path, "".join(line + "\n" for line in keep))


def _fmt_progress(step: int, total: int, s: Mapping[str, float]) -> str:
    parts = [f"step {step}/{total}", f"lr {s['lr']:.4g}"]
    for role in ("max", "random1", "random2", "min"):
        if f"{role}/loss" in s:
            parts.append(f"{role} {s[role + '/loss']:.3f}/{100 * s[role + '/acc']:.0f}%")
    parts += [f"|g| {s['grad_norm']:.3g}", f"clip {100 * s['clip_fraction']:.1f}%",
              f"{s['images_per_sec']:.0f} img/s", f"{1000 * s['step_time']:.0f} ms"]
    return " | ".join(parts)


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
    mesh_lib.initialize_distributed(config.distributed)
    space = get_space(config.space)
    mesh = mesh_lib.make_mesh(config.mesh.data)
    host_bs = mesh_lib.host_batch_size(config.batch_size, mesh)
    check_bn_group_size(config, mesh.devices.size)
    pi, pc = jax.process_index(), jax.process_count()
    info = data_lib.dataset_info(config.data)
    if info["num_classes"] != space.num_classes:
        raise errors.ConfigError(f"the dataset has {info['num_classes']} classes but the search space "
                                 f"{space.name!r} has num_classes={space.num_classes}; set config.space.num_classes")
    is_main = pi == 0
    os.makedirs(workdir, exist_ok=True)
    if is_main:
        atomic_write(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=1))

    model = make_model(config, space)
    data_state = None
    # Steps per epoch come from the iterator (whole batches per host).
    probe = data_lib.make_train_iterator(config.data, batch_size=host_bs, seed=config.seed, process_index=pi,
                                         process_count=pc)
    steps_per_epoch = probe.steps_per_epoch
    del probe
    total_steps, warmup_steps = resolve_schedule(config, steps_per_epoch)
    lr = learning_rate_fn(config, total_steps, warmup_steps)
    tx = make_optimizer(config, lr)
    meta = checkpoint_meta(config, space)
    # Opened once the schedule and batch size are accepted: a rejected one leaves no Orbax thread behind.
    ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                               async_save=config.checkpoint.async_save)
    found = ck.restore_newest(abstract_state(model, tx, mesh), meta, log=log)
    if found is not None:
        start, state, data_state, _ = found
        log(f"resumed from {workdir}/checkpoints/{start}")
    else:
        state, _ = create_state(model, tx, config.seed, mesh)
    first_step = int(jax.device_get(state["step"]))
    it = data_lib.make_train_iterator(config.data, batch_size=host_bs, seed=config.seed, process_index=pi,
                                      process_count=pc, state=data_state)
    batches = data_lib.prefetch(it, config.data_prefetch) if config.data_prefetch > 0 else it
    step_fn = SandwichStep(model, tx, config, mesh)
    writer = MetricWriter(workdir, is_main, resume_step=first_step)
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
                t_compile = time.perf_counter()
                secs = step_fn.precompile(state, batch, step_encodings(space), rng)
                log(f"compiled {len(secs)} programs in {time.perf_counter() - t_compile:.1f} s "
                    f"(slowest: {max(secs, key=secs.get)}, {max(secs.values()):.1f} s)")
            state, metrics = step_fn(state, batch, encs, rng)
            n_last += 1
            done = step + 1
            log_now = itstime(done, config.log_every_steps, total_steps)
            eval_now = itstime(done, config.eval.every_steps, total_steps, last=False) and info["num_val"] > 0
            save_now = itstime(done, config.checkpoint.every_steps, total_steps)
            if log_now:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                dt = (time.perf_counter() - t_last) / n_last
                m.update(lr=float(lr(step)), step_time=dt, images_per_sec=config.batch_size / dt,
                         skipped=int(state["skipped"]), compiled_programs=step_fn.num_compiled())
                t_last, n_last = time.perf_counter(), 0
                writer.write(done, m)
                log(_fmt_progress(done, total_steps, m))
                last_metrics = m
                _check_bad_streak(config, state, ck)
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
