"""BN calibration and evaluation of subnets of the masked supernet (spec §7).

The reference evaluates a subnet by extracting it, resetting every BN's running
statistics, running the training loader (with augmentation) through it in train
mode with BN momentum None (a cumulative average), and then evaluating the val
set in eval mode. Here the masked supernet does the same without extraction:

* `calibrate_bn`: runs the subnet in train mode on N batches. For every BN
  channel the subnet uses, the calibrated running mean is the plain average over
  the batches of the per-batch means and the running var the average of the
  per-batch **unbiased** variances (what PyTorch's cumulative average gives;
  resetting first is implicit, as the first batch replaces the reset values).
  Sums are accumulated on the device in float32 and divided by N at the end.
  Channels and blocks the subnet does not use keep their stored values bit for bit.
* `evaluate`: eval mode with the stored statistics; exact integer counts of top-1 /
  top-5 hits over the real (unmasked) examples, plain cross-entropy.

Batch statistics are taken over the **whole global batch** passed in: the batch is
sharded over the mesh's data axis and the step is a plain `jax.jit`, so XLA
all-reduces the BN moments across devices. This matches the reference's
calibration, which `test_alphanet.py` runs on a single GPU with batch 256 (give a
global batch of 256 to reproduce it), not the per-device statistics used in training.

Compilation: the subnet enters the jitted steps as an `EncodedSubnet` (arrays),
so there is one compiled calibration program and one evaluation program per
(resolution, batch shape), shared by every subnet. `Evaluator` holds them, one per
(model, mesh); `get_evaluator` caches it.

Batches are plain iterables of host dicts: calibration `dict(image=float32[B,H,W,3],
label=...)` (the label is ignored), evaluation `dict(image, label=int32[B],
mask=bool[B])` (no `mask`: every example counts). B is this host's part of the
global batch (`mesh.to_global` places it).
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from alphanet_jax import mesh as mesh_lib
from alphanet_jax.errors import ConfigError
from alphanet_jax.flops import count_flops, count_params
from alphanet_jax.search_space import SubnetConfig, get_space
from alphanet_jax.subnet_encoding import EncodedSubnet, encode

__all__ = ["Evaluator", "get_evaluator", "calibrate_bn", "evaluate", "calibrate_and_evaluate",
           "make_evaluate_fn", "default_mesh", "local_mesh"]


# ----------------------------------------------------------------------------
# Meshes
# ----------------------------------------------------------------------------


def default_mesh() -> Mesh:
    """The mesh used when none is given: the first local device only."""
    return Mesh(np.asarray(jax.local_devices()[:1]), (mesh_lib.DATA,))


def local_mesh() -> Mesh:
    """A data-parallel mesh over this process's devices only.

    For work that each host does on its own, such as the evolutionary search,
    where every host evaluates different candidates on the full val set (the
    reference's `distributed_val: False`). Feed it unsharded iterators
    (`process_index=0, process_count=1`).
    """
    return Mesh(np.asarray(jax.local_devices()), (mesh_lib.DATA,))


# ----------------------------------------------------------------------------
# The compiled steps
# ----------------------------------------------------------------------------


def _subnet_of(subnet: Any, space) -> SubnetConfig | None:
    if isinstance(subnet, EncodedSubnet):
        return None
    if isinstance(subnet, SubnetConfig):
        return subnet.validate(space)
    return SubnetConfig.from_dict(subnet, space)


class Evaluator:
    """Jitted BN-calibration and evaluation steps for one (model, mesh).

    `model` is a `Supernet` (anything with `.space` and the same `apply`
    signature). One compiled program per resolution and batch shape serves every
    subnet; `num_compiled()` reports how many exist.
    """

    def __init__(self, model: Any, mesh: Mesh | None = None):
        self.model = model
        self.space = get_space(getattr(model, "space", None))
        self.mesh = mesh if mesh is not None else default_mesh()
        self._replicated = mesh_lib.replicated(self.mesh)
        num_classes = self.space.num_classes
        topk = min(5, num_classes)

        def calib_step(params, stats, acc, changed, images, enc):
            _, new = model.apply({"params": params, "batch_stats": stats}, images, enc, train=True,
                                 mutable=["batch_stats"])
            new = new["batch_stats"]
            acc = jax.tree.map(lambda a, n: a + n.astype(jnp.float32), acc, new)
            # Entries the subnet does not use come back as the stored value exactly.
            changed = jax.tree.map(lambda c, n, s: c | (n != s), changed, new, stats)
            return acc, changed

        def eval_step(params, stats, acc, images, labels, mask, enc):
            logits = model.apply({"params": params, "batch_stats": stats}, images, enc, train=False)
            logits = logits.astype(jnp.float32)
            labels = labels.astype(jnp.int32)
            _, top = jax.lax.top_k(logits, topk)
            hit = top == labels[:, None]
            ce = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
            return {"top1": acc["top1"] + jnp.sum(hit[:, 0] & mask, dtype=jnp.int32),
                    "top5": acc["top5"] + jnp.sum(jnp.any(hit, axis=-1) & mask, dtype=jnp.int32),
                    "loss": acc["loss"] + jnp.sum(jnp.where(mask, ce, 0.0)),
                    "count": acc["count"] + jnp.sum(mask, dtype=jnp.int32)}

        rep = self._replicated
        # Donating the accumulators saves a copy per batch; the CPU backend cannot use donations.
        donate = self.mesh.devices.flat[0].platform != "cpu"
        self._calib_step = jax.jit(calib_step, donate_argnums=(2, 3) if donate else (), out_shardings=(rep, rep))
        self._eval_step = jax.jit(eval_step, donate_argnums=(2,) if donate else (), out_shardings=rep)
        self._finish = jax.jit(
            lambda acc, changed, stats, n: jax.tree.map(
                lambda a, c, s: jnp.where(c, a / n, s).astype(s.dtype), acc, changed, stats),
            out_shardings=rep)
        self._zeros = jax.jit(lambda t: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), t),
                              out_shardings=rep)
        self._falses = jax.jit(lambda t: jax.tree.map(lambda x: jnp.zeros(x.shape, bool), t), out_shardings=rep)

    # -- helpers ---------------------------------------------------------------
    def num_compiled(self) -> dict[str, int]:
        """Compiled programs per step: {'calibrate': n, 'evaluate': m} (one per resolution and batch shape)."""
        return {"calibrate": self._calib_step._cache_size(), "evaluate": self._eval_step._cache_size()}

    def place_variables(self, variables: Mapping[str, Any]) -> dict:
        """Variables replicated over the mesh (a no-op when they already are)."""
        return jax.device_put(dict(variables), self._replicated)

    def encode(self, subnet: Any) -> EncodedSubnet:
        """A SubnetConfig, its dict or an EncodedSubnet -> the EncodedSubnet the jitted steps take."""
        if isinstance(subnet, EncodedSubnet):
            return subnet
        return encode(_subnet_of(subnet, self.space), self.space)

    def _put(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        return mesh_lib.to_global({k: np.asarray(v) for k, v in batch.items()}, self.mesh)

    # -- calibration -------------------------------------------------------------
    def calibrate(self, variables: Mapping[str, Any], subnet: Any, batches: Iterable[Mapping[str, Any]],
                  *, num_batches: int | None = None) -> dict:
        """`variables` with the subnet's BN statistics recalibrated on `batches` (spec §7 step 2).

        Uses every batch of `batches`, or the first `num_batches` (needed for an
        infinite iterator such as `data.make_calibration_iterator`; the reference
        uses 64 batches of 256). Only the subnet's active channels and blocks change.
        """
        variables = self.place_variables(variables)
        enc = self.encode(subnet)
        params, stats = variables["params"], variables["batch_stats"]
        acc = self._zeros(stats)
        changed = self._falses(stats)
        n = 0
        it = batches if num_batches is None else itertools.islice(batches, num_batches)
        for batch in it:
            g = self._put({"image": batch["image"]})
            acc, changed = self._calib_step(params, stats, acc, changed, g["image"], enc)
            n += 1
        if n == 0:
            raise ConfigError("calibrate_bn got no batches: BN calibration needs at least one batch")
        if num_batches is not None and n < num_batches:
            logging.warning("BN calibration asked for %d batches but the iterator gave only %d", num_batches, n)
        new_stats = self._finish(acc, changed, stats, jnp.float32(n))
        out = dict(variables)
        out["batch_stats"] = new_stats
        return out

    # -- evaluation ---------------------------------------------------------------
    def evaluate(self, variables: Mapping[str, Any], subnet: Any, batches: Iterable[Mapping[str, Any]]
                 ) -> dict[str, Any]:
        """{'top1', 'top5' (percent), 'loss' (mean plain CE), 'count' (real examples)} over `batches`."""
        variables = self.place_variables(variables)
        enc = self.encode(subnet)
        params, stats = variables["params"], variables["batch_stats"]
        acc = jax.device_put({"top1": np.int32(0), "top5": np.int32(0), "loss": np.float32(0),
                              "count": np.int32(0)}, self._replicated)
        for batch in batches:
            host = {"image": batch["image"], "label": np.asarray(batch["label"], np.int32)}
            host["mask"] = (np.asarray(batch["mask"], bool) if "mask" in batch
                            else np.ones(np.shape(batch["label"]), bool))
            g = self._put(host)
            acc = self._eval_step(params, stats, acc, g["image"], g["label"], g["mask"], enc)
        acc = jax.device_get(acc)
        count = int(acc["count"])
        if count == 0:
            return {"top1": math.nan, "top5": math.nan, "loss": math.nan, "count": 0}
        return {"top1": 100.0 * int(acc["top1"]) / count, "top5": 100.0 * int(acc["top5"]) / count,
                "loss": float(acc["loss"]) / count, "count": count,
                "correct1": int(acc["top1"]), "correct5": int(acc["top5"])}


_EVALUATORS: dict[Any, Evaluator] = {}
_LOCK = threading.Lock()


def get_evaluator(model: Any, mesh: Mesh | None = None) -> Evaluator:
    """The cached `Evaluator` for (model, mesh): the jitted steps are built once."""
    mesh = mesh if mesh is not None else default_mesh()
    try:
        key: Any = (model, mesh)  # Flax modules hash and compare by their fields
        hash(key)
    except TypeError:  # an unhashable model: one evaluator per object
        key = (id(model), mesh)
    with _LOCK:
        ev = _EVALUATORS.get(key)
        if ev is None:
            ev = _EVALUATORS[key] = Evaluator(model, mesh)
        return ev


# ----------------------------------------------------------------------------
# Functional interface
# ----------------------------------------------------------------------------


def calibrate_bn(model: Any, variables: Mapping[str, Any], subnet: Any, batches: Iterable[Mapping[str, Any]],
                 *, mesh: Mesh | None = None, num_batches: int | None = None) -> dict:
    """BN calibration (spec §7): the subnet's running mean = mean of per-batch means, running var =
    mean of per-batch unbiased variances, over every batch in `batches` (or the first `num_batches`).

    Statistics are over the whole global batch (see the module docstring). Channels and blocks
    outside the subnet keep their values. Returns new variables (replicated on `mesh`).
    """
    return get_evaluator(model, mesh).calibrate(variables, subnet, batches, num_batches=num_batches)


def evaluate(model: Any, variables: Mapping[str, Any], subnet: Any, batches: Iterable[Mapping[str, Any]],
             *, mesh: Mesh | None = None) -> dict[str, Any]:
    """Eval-mode top-1/top-5 (percent), mean plain CE and the exact count of real examples.

    Padded examples (mask False) do not count.
    """
    return get_evaluator(model, mesh).evaluate(variables, subnet, batches)


def calibrate_and_evaluate(model: Any, variables: Mapping[str, Any], subnet: Any,
                           calib_batches: Iterable[Mapping[str, Any]], eval_batches: Iterable[Mapping[str, Any]],
                           *, mesh: Mesh | None = None, num_calib_batches: int | None = None) -> dict[str, Any]:
    """Calibrate then evaluate one subnet; returns a result row:

    {subnet (dict), resolution, mflops, params, top1, top5, loss, count, seconds}.
    """
    ev = get_evaluator(model, mesh)
    cfg = _subnet_of(subnet, ev.space)
    if cfg is None:
        raise TypeError("calibrate_and_evaluate needs a SubnetConfig (or its dict), not an EncodedSubnet")
    t0 = time.perf_counter()
    calibrated = ev.calibrate(variables, cfg, calib_batches, num_batches=num_calib_batches)
    res = ev.evaluate(calibrated, cfg, eval_batches)
    seconds = time.perf_counter() - t0
    return {"subnet": cfg.to_dict(), "resolution": cfg.resolution, "mflops": count_flops(cfg, ev.space),
            "params": count_params(cfg, ev.space), "top1": res["top1"], "top5": res["top5"],
            "loss": res["loss"], "count": res["count"], "seconds": seconds}


def make_evaluate_fn(model: Any, variables: Mapping[str, Any], calib_batches: Callable[[], Iterable],
                     eval_batches: Callable[[], Iterable], *, mesh: Mesh | None = None,
                     num_calib_batches: int | None = None) -> Callable[[SubnetConfig], dict]:
    """`evaluate_fn(subnet) -> row` for `search.run_search`.

    `calib_batches` / `eval_batches` are factories called once per subnet (e.g.
    `lambda: make_calibration_iterator(cfg, batch_size=256, seed=0)` with
    `num_calib_batches=64`, as that iterator is infinite; a fixed seed calibrates
    every candidate on the same images). With several processes in the
    search, pass `mesh=local_mesh()` and unsharded iterators: each host evaluates
    its own candidates.
    """
    ev = get_evaluator(model, mesh)
    placed = ev.place_variables(variables)

    def evaluate_fn(subnet: SubnetConfig) -> dict:
        return calibrate_and_evaluate(model, placed, subnet, calib_batches(), eval_batches(), mesh=ev.mesh,
                                      num_calib_batches=num_calib_batches)

    return evaluate_fn
