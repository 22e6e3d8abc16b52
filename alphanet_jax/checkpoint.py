"""A thin wrapper over Orbax's CheckpointManager for the training state.

A checkpoint holds the train state (params, BN statistics, optimizer state,
step), the data iterator's position and run metadata (search space, config) as
JSON. Orbax writes each step to a temporary directory and renames it when
complete, so a crash mid-write never leaves a checkpoint that `latest_step`
returns. Restores check that the checkpoint was made for the same search space
and that every tensor exists with the right shape.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
    """A checkpoint cannot be used for this run."""


_DELETE_HINT = "delete that step directory to resume from an earlier one"


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    """The train state's handler: Orbax's standard one, except that arrays are not replica-parallel.

    The state is replicated over the data axis. Orbax's default (on every platform but an explicit
    JAX_PLATFORMS=gpu/cuda) splits each replicated array into one slice per device and has every
    replica write its slice, with an eager `slice_in_dim` per slice: 8 x ~200 tiny programs to
    compile on the first save (~20 s on CPU, more on a larger mesh) and ~1500 dispatches on every
    save after it. Here the first replica (on process 0) writes each array whole, as the
    reference's rank 0 does. The array files are StandardSave's (checkpoints written before this
    change restore unchanged); only the per-process `array_metadatas/` side files are not written.
    """
    registry = ocp.type_handlers.create_type_handler_registry(
        (jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False)),
        *[(t, ocp.type_handlers.get_type_handler(t)) for t in (int, float, bytes, np.number, np.ndarray, str)])
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


class Checkpointer:
    """Saves/restores {state, data, meta} under `directory` (keeps the newest `keep`)."""

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True)
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            "state": _state_handler(), "data": ocp.JsonCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def save(self, step: int, state: Any, data_state: dict, meta: dict, force: bool = True) -> bool:
        """Starts an (async) save; refuses non-finite states (they would poison a resume)."""
        bad = nonfinite_leaves(state)
        if bad:
            raise CheckpointError(f"refusing to save step {step}: non-finite values in {bad[:5]}")
        return self._mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)), force=force)

    def restore(self, step: int, abstract_state: Any, expected_meta: dict | None = None
                ) -> tuple[Any, dict, dict]:
        """(state, data_state, meta) of `step`, laid out like `abstract_state` (shape/dtype/sharding)."""
        meta = self.restore_meta(step)
        if expected_meta:
            for key in ("space",):
                if key in expected_meta and meta.get(key) != expected_meta[key]:
                    raise CheckpointError(
                        f"checkpoint {self.directory}/{step} was written for another search space "
                        f"({_space_name(meta.get(key))}) than this run ({_space_name(expected_meta[key])}); "
                        f"use the same config or another --workdir")
        self._check_shapes(step, abstract_state)
        try:
            r = self._mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)),
                data=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types for damaged files
            raise CheckpointError(f"checkpoint {self.directory}/{step} could not be read ({type(e).__name__}: "
                                  f"{e}); {_DELETE_HINT}") from e
        return r["state"], r["data"], meta

    def restore_meta(self, step: int) -> dict:
        path = os.path.join(self.directory, str(step), "meta", "metadata")
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"checkpoint {self.directory}/{step} is incomplete or damaged: cannot read "
                                  f"{path} ({e}); {_DELETE_HINT}") from e

    def _check_shapes(self, step: int, abstract_state: Any) -> None:
        try:
            stored = self._mngr.item_metadata(step)["state"]
        except Exception as e:
            raise CheckpointError(f"checkpoint {self.directory}/{step} is incomplete or damaged: {e}; "
                                  f"{_DELETE_HINT}") from e
        if stored is None:
            return
        # Paths as plain names: the stored metadata holds optimizer namedtuples as dicts.
        name = lambda p: jax.tree_util.keystr(p, simple=True, separator="/")  # noqa: E731
        want = {name(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
        have = {name(p): tuple(getattr(x, "shape", ()) or ()) for p, x in
                jax.tree_util.tree_flatten_with_path(stored)[0]}
        missing = sorted(set(want) - set(have))
        extra = sorted(set(have) - set(want))
        bad = sorted(k for k in set(want) & set(have) if want[k] != have[k])
        if missing or extra or bad:
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} does not fit this model: missing {missing[:4]}, "
                f"unexpected {extra[:4]}, mis-shaped {[(k, have[k], want[k]) for k in bad[:4]]}")

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


@jax.jit
def _finite_flags(leaves: list) -> jax.Array:
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def nonfinite_leaves(tree: Any) -> list[str]:
    """Paths of the floating-point leaves of `tree` that hold a NaN or an infinity.

    One compiled program checks every leaf (and one device->host transfer reads the flags):
    a per-leaf eager `isfinite().all()` compiled two tiny programs per distinct leaf shape and
    synchronised once per leaf, which made the first save of a run take ~10 s on CPU.
    """
    flat = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if jnp.issubdtype(getattr(x, "dtype", np.dtype(object)), jnp.floating)]
    if not flat:
        return []
    ok = np.asarray(jax.device_get(_finite_flags([x for _, x in flat])))
    return [jax.tree_util.keystr(p) for (p, _), good in zip(flat, ok) if not good]


def _space_name(space: Any) -> str:
    return repr(space.get("name")) if isinstance(space, dict) else repr(space)


def find_latest_valid(ckpt: Checkpointer) -> int | None:
    """The newest step whose metadata reads back (older ones are tried when the newest is damaged)."""
    for step in sorted(ckpt.all_steps(), reverse=True):
        try:
            ckpt.restore_meta(step)
            return step
        except CheckpointError as e:
            logging.warning("skipping damaged checkpoint: %s", e)
    return None
