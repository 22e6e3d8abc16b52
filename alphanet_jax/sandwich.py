"""The sandwich step (spec §6): the compiled pieces of one supernet training step.

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
import os
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from alphanet_jax import errors
from alphanet_jax import export as export_lib
from alphanet_jax import losses
from alphanet_jax import mesh as mesh_lib
from alphanet_jax.search_space import SearchSpace
from alphanet_jax.subnet_encoding import EncodedSubnet, encode
from alphanet_jax.supernet import Supernet

Array = jax.Array

DISTILL_LOSSES = ("alpha", "kl", "none")  # sandwich.distill


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
        self.donate = donate = jax.default_backend() != "cpu"  # CPU ignores donation (and warns)
        # (gradients, logits, metrics): the logits as batch-sharded as the max subnet's zero teacher, so
        # that a student's call matches the max subnet's signature (one jit cache entry per program).
        outs = (mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh))
        self.subnet_fn = jax.jit(self._subnet, donate_argnums=(2,) if donate else (), out_shardings=outs)
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
        self.min_fn = jax.jit(self._min_subnet, donate_argnums=(2,) if donate else (), out_shardings=outs)
        # The max subnet's gradient accumulator: with donation, zeros made by the previous update
        # (None before the first step: then made on the host, which compiles nothing); without (CPU),
        # one array of host zeros that every step reuses, since nothing overwrites it.
        self._zero_grads = None
        self._zero_teachers: dict[tuple[int, ...], Array] = {}  # batch shape -> zero logits (`_zero_teacher`)

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
        `len(resolutions) + 2` programs; on accelerators the accumulator is donated, so each is used once;
        without donation (CPU) the same host zeros serve every step.
        """
        zeros = self._zero_grads
        if self.donate:
            self._zero_grads = None
        if zeros is None:
            rep = mesh_lib.replicated(self.mesh)
            zeros = jax.tree.map(lambda a: jax.make_array_from_callback(
                a.shape, rep, lambda idx, a=a: np.zeros(a.shape, a.dtype)[idx]), params)
            if not self.donate:
                self._zero_grads = zeros
        return zeros

    def _zero_teacher(self, labels: Array) -> Array:
        """Zero logits in the teacher's place for the max subnet (it learns from labels; never read).
        Made once per batch shape: never donated, so one array serves every step."""
        shape = labels.shape + (self.model.space.num_classes,)
        if shape not in self._zero_teachers:
            self._zero_teachers[shape] = jax.make_array_from_callback(
                shape, mesh_lib.batch_sharding(self.mesh), lambda idx: np.zeros(shape, np.float32)[idx])
        return self._zero_teachers[shape]

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
        # The next step's gradient accumulator, in the donated gradients' buffers (none without
        # donation: 469 outputs fewer to compile for AlphaNet).
        zeros = jax.tree.map(jnp.zeros_like, grads) if self.donate else None
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
        state, m, zeros = self.update_fn(state, grads)
        if self.donate:
            self._zero_grads = zeros
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
        so there the default is one compile thread, while this thread lowers (traces) the next program:
        117 -> 110 s. A program's seconds are its lowering's plus its compile's.
        """
        from concurrent.futures import ThreadPoolExecutor

        def timed(f):
            t = time.perf_counter()
            f()
            return time.perf_counter() - t

        lowerings = self.lowerings(state, batch, encs, rng)
        cores = os.cpu_count() or 1
        workers = max_workers or (1 if cores <= 2 else min(len(lowerings), cores))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            if workers > 1:
                seconds = pool.map(lambda lower: timed(lambda: lower().compile()), lowerings.values())
                return dict(zip(lowerings, seconds))
            # Python lowers the next program while XLA compiles this one in its own threads.
            pending = {}
            for name, lower in lowerings.items():
                t = time.perf_counter()
                lowered = lower()
                pending[name] = (time.perf_counter() - t, pool.submit(timed, lowered.compile))
            return {name: lowering + compiling.result() for name, (lowering, compiling) in pending.items()}


def step_encodings(space: SearchSpace) -> dict[Any, EncodedSubnet]:
    """{'max': the max subnet, r: a subnet at resolution r for each r}: one of each program's inputs."""
    encs: dict[Any, EncodedSubnet] = {"max": encode(space.max_subnet(), space)}
    for r in space.resolutions:
        encs[r] = encode(space.min_subnet().replace(resolution=r), space)
    return encs
