"""Device mesh, shardings, host-to-device batches, multi-host start-up and process collectives."""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from alphanet_jax.console import log
from alphanet_jax.errors import ConfigError

DATA = "data"


def initialize_distributed(cfg: Mapping[str, Any] | None = None) -> None:
    """Starts jax.distributed when the run spans processes.

    `cfg` may give coordinator_address, num_processes and process_id (GPU
    clusters); with `auto=True` (TPU pods, SLURM, ...) jax detects them itself.
    Does nothing for a single process or when already initialised.
    """
    cfg = dict(cfg or {})
    if jax.distributed.is_initialized():
        return
    addr = cfg.get("coordinator_address") or ""
    nproc = int(cfg.get("num_processes") or 0)
    if addr:
        if nproc < 1 or cfg.get("process_id") is None or int(cfg["process_id"]) < 0:
            raise ConfigError("distributed.coordinator_address is set, so distributed.num_processes (>=1) and "
                              "distributed.process_id (0..num_processes-1) must be set too")
        if not 0 <= int(cfg["process_id"]) < nproc:
            raise ConfigError(f"distributed.process_id {cfg['process_id']} is outside 0..{nproc - 1}")
        jax.distributed.initialize(coordinator_address=addr, num_processes=nproc,
                                   process_id=int(cfg["process_id"]))
    elif cfg.get("auto"):
        jax.distributed.initialize()
    if jax.process_count() > 1:
        log(f"{jax.process_count()} processes, {jax.local_device_count()} local / {jax.device_count()} global "
            f"devices")


def make_mesh(data_parallel: int = -1) -> Mesh:
    """A 1-D data-parallel mesh over `data_parallel` devices (-1: all)."""
    n = jax.device_count()
    size = n if data_parallel in (-1, 0, None) else int(data_parallel)
    if size > n or size < 1:
        raise ConfigError(f"mesh.data = {data_parallel} but {n} devices are visible")
    devices = np.asarray(jax.devices()[:size])
    return Mesh(devices, (DATA,), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA))


def check_batch_size(global_batch: int, mesh: Mesh, what: str = "batch_size") -> int:
    """Per-device batch; a clear error if the batch does not split evenly."""
    n = mesh.devices.size
    if global_batch % n or global_batch % jax.process_count():
        raise ConfigError(f"{what} = {global_batch} is not divisible by the {n} devices of the mesh "
                          f"({jax.process_count()} processes); use a multiple of {n}")
    return global_batch // n


def host_batch_size(global_batch: int, mesh: Mesh) -> int:
    check_batch_size(global_batch, mesh)
    return global_batch // jax.process_count()


def to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This host's slice of a batch -> globally sharded arrays along the data axis."""
    sh = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in batch.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
    return jax.device_put(tree, replicated(mesh))


def hide_gpus_from_tensorflow() -> None:
    """Keeps TensorFlow (if some data path imports it) off the accelerators."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import sys
        if "tensorflow" in sys.modules:
            sys.modules["tensorflow"].config.set_visible_devices([], "GPU")
    except Exception:  # pragma: no cover - best effort only
        pass


def any_process(flag: bool) -> bool:
    """`flag` OR-ed over all processes (each process must call this at the same point)."""
    return bool(np.any(_gather_flags(flag)))


def all_processes(flag: bool) -> bool:
    """`flag` AND-ed over all processes (each process must call this at the same point)."""
    return bool(np.all(_gather_flags(flag)))


def _gather_flags(flag: bool) -> np.ndarray:
    if jax.process_count() == 1:
        return np.asarray([flag])
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(np.asarray([flag], np.int32))


def sync_processes(name: str) -> None:
    """A barrier over all processes (nothing to do in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
