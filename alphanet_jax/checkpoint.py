"""A thin wrapper over Orbax's CheckpointManager for the training state.

A checkpoint holds the train state (params, BN statistics, optimizer state,
step), the data iterator's position and run metadata (search space, config) as
JSON. Orbax writes each step to a temporary directory and renames it when
complete, so a crash mid-write never leaves a checkpoint that `latest_step`
returns. Restores check that the checkpoint was made for the same search space
and that every tensor exists with the right shape.

Integrity: Orbax/TensorStore checksum only the chunk index of an array file, not its
data (flipped bytes inside a tensor file restore silently), so every save stores a
digest per array leaf in the metadata, and every restore recomputes and compares them.
`restore_newest` takes the newest checkpoint that is complete and verifies; a damaged
one is reported in one line and moved aside (`<dir>-damaged/<step>`, never deleted), so a
later save of that step works.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from alphanet_jax import mesh as mesh_lib
from alphanet_jax.errors import CheckpointError  # the package's type: a checkpoint unusable for this run
from alphanet_jax.fingerprint import leaf_digests


class DamagedCheckpointError(CheckpointError):
    """A checkpoint whose files are missing, truncated or fail verification (older ones may be fine)."""


_DELETE_HINT = "delete that step directory to resume from an earlier one"
DIGESTS_KEY = "digests"  # meta key: {leaf path: digest of its dtype, shape and bytes}


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

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True, read_only: bool = False):
        """`read_only` (evaluation, search, export): never writes, and leaves the temporary directories
        of a save in progress alone (a run training in the same workdir)."""
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(keep), read_only=read_only,
            enable_async_checkpointing=async_save, create=not read_only, cleanup_tmp_directories=not read_only)
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
        meta = dict(meta, **{DIGESTS_KEY: leaf_digests(state)})
        return self._mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)), force=force)

    def restore(self, step: int, abstract_state: Any, expected_meta: dict | None = None
                ) -> tuple[Any, dict, dict]:
        """(state, data_state, meta) of `step`, laid out like `abstract_state` (shape/dtype/sharding).

        Raises DamagedCheckpointError for missing, truncated or corrupted files (digest mismatch),
        CheckpointError for a checkpoint of another space or model.
        """
        where = f"checkpoint {self.directory}/{step}"
        meta = self.restore_meta(step)
        if expected_meta:
            for key in ("space",):
                if key in expected_meta and meta.get(key) != expected_meta[key]:
                    raise CheckpointError(
                        f"{where} was written for another search space "
                        f"({_space_name(meta.get(key))}) than this run ({_space_name(expected_meta[key])}); "
                        f"use the same config or another --workdir")
        self._check_shapes(step, abstract_state)
        try:
            r = self._mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)),
                data=ocp.args.JsonRestore()))
        except Exception as e:  # orbax/tensorstore raise many types (with pages of text) for damaged files
            if not _is_damage(e):
                raise  # e.g. out of memory, permission denied: not the checkpoint's fault
            raise DamagedCheckpointError(f"{where} could not be read ({type(e).__name__}: {_first_line(e)}); "
                                         f"{_DELETE_HINT}") from e
        stored = meta.get(DIGESTS_KEY)
        if stored is None:
            logging.warning("%s has no digests (written before integrity checks): its values are not verified",
                            where)
        else:
            have = leaf_digests(r["state"])
            bad = sorted(k for k in set(stored) | set(have) if stored.get(k) != have.get(k))
            if bad:
                raise DamagedCheckpointError(
                    f"{where} is corrupted: {len(bad)} array(s) differ from the digests stored when it was saved "
                    f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); {_DELETE_HINT}")
        return r["state"], r["data"], meta

    def restore_meta(self, step: int) -> dict:
        path = os.path.join(self.directory, str(step), "meta", "metadata")
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise DamagedCheckpointError(f"checkpoint {self.directory}/{step} is incomplete or damaged: cannot "
                                         f"read {path} ({e}); {_DELETE_HINT}") from e

    def restore_newest(self, abstract_state: Any, expected_meta: dict | None = None, *, move_aside: bool = True,
                       log: Callable[[str], None] = logging.warning) -> tuple[int, Any, dict, dict] | None:
        """(step, state, data_state, meta) of the newest checkpoint that is complete and verifies, or None.

        A damaged checkpoint is reported in one line and skipped; with `move_aside` (training) it is
        renamed to `<directory>-damaged/<step>` (never deleted), so that the run can save that step again
        instead of failing on it at every rerun. A checkpoint of another space or model still raises.
        """
        found, damaged = None, []
        steps = sorted(self.all_steps(), reverse=True)
        for step in steps:
            try:
                found, reason = (step, *self.restore(step, abstract_state, expected_meta)), None
            except DamagedCheckpointError as e:
                found, reason = None, str(e).replace("; " + _DELETE_HINT, "")
            # Every process restores the same step: one that any process cannot verify is skipped by all.
            if not mesh_lib.all_processes(reason is None):
                reason = reason or f"checkpoint {self.directory}/{step} failed verification on another process"
            if reason is None:
                break
            found = None
            damaged.append(step)
            log(f"skipping a damaged checkpoint: {reason}" +
                (f"; moving it to {self._aside_dir(step)}" if move_aside else ""))
        if move_aside and damaged:
            mesh_lib.sync_processes("alphanet-checkpoint-move-aside")  # every process has finished reading
            failed = None
            if jax.process_index() == 0:
                try:
                    for step in damaged:
                        os.makedirs(os.path.dirname(self._aside_dir(step)), exist_ok=True)
                        os.rename(os.path.join(self.directory, str(step)), self._aside_dir(step))
                except OSError as e:
                    failed = e
            mesh_lib.sync_processes("alphanet-checkpoint-moved-aside")
            if not mesh_lib.all_processes(failed is None):
                raise CheckpointError(f"cannot move the damaged checkpoint(s) {damaged} out of {self.directory}"
                                      f" ({failed or 'failed on process 0'}); move them by hand and rerun")
            self._mngr.reload()
            if found is None:
                raise CheckpointError(
                    f"none of the {len(damaged)} checkpoint(s) in {self.directory} verifies (steps {damaged}, "
                    f"moved to {self.directory}-damaged/): rerun to train from step 0, or move a step back by "
                    f"hand if you know it is good")
        return found

    def _aside_dir(self, step: int) -> str:
        base = os.path.join(self.directory + "-damaged", str(step))
        path, n = base, 1
        while os.path.exists(path):
            path, n = f"{base}.{n}", n + 1
        return path

    def _check_shapes(self, step: int, abstract_state: Any) -> None:
        try:
            stored = self._mngr.item_metadata(step)["state"]
        except Exception as e:
            if not _is_damage(e):
                raise
            raise DamagedCheckpointError(f"checkpoint {self.directory}/{step} is incomplete or damaged: "
                                         f"{_first_line(e)}; {_DELETE_HINT}") from e
        if stored is None:
            return
        # Paths as plain names: the stored metadata holds optimizer namedtuples as dicts.
        name = lambda p: jax.tree_util.keystr(p, simple=True, separator="/")  # noqa: E731
        # Dtypes too: Orbax would convert on restore, and the digests (of the stored dtype) would not match.
        want = {name(p): (tuple(x.shape), np.dtype(x.dtype)) for p, x in
                jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
        have = {name(p): (tuple(getattr(x, "shape", ()) or ()), getattr(x, "dtype", None)) for p, x in
                jax.tree_util.tree_flatten_with_path(stored)[0]}  # dtype None: not recorded
        missing = sorted(set(want) - set(have))
        extra = sorted(set(have) - set(want))
        bad = sorted(k for k in set(want) & set(have) if want[k][0] != have[k][0])
        retyped = sorted(k for k in set(want) & set(have)
                         if have[k][1] is not None and np.dtype(have[k][1]) != want[k][1])
        if missing or extra or bad or retyped:
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} does not fit this model: missing {missing[:4]}, "
                f"unexpected {extra[:4]}, mis-shaped {[(k, have[k][0], want[k][0]) for k in bad[:4]]}, "
                f"other dtype {[(k, np.dtype(have[k][1]).name, want[k][1].name) for k in retyped[:4]]}")

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


# What TensorStore/Orbax report for missing, truncated or corrupted files (anything else, such as
# RESOURCE_EXHAUSTED or PERMISSION_DENIED, is not the checkpoint's fault and propagates).
_DAMAGE_MARKERS = ("DATA_LOSS", "NOT_FOUND", "OUT_OF_RANGE", "Error reading", "Error opening", "Error decoding")


def _is_damage(e: BaseException) -> bool:
    if isinstance(e, (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, EOFError)):
        return True
    text = str(e)
    return any(m in text for m in _DAMAGE_MARKERS)


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return text if len(text) <= limit else text[:limit] + " ..."

