"""The search's exchange of float64 arrays between processes, bit for bit (`JaxComm`), and its
single-process stand-in. jax is imported only when a `JaxComm` is made or used.

jax without x64 would round float64 to float32; the arrays travel as their raw bits (int32 words), so
every process's numbers stay identical, which keeps multi-host searches in lockstep.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["JaxComm", "SingleComm", "default_comm"]


class JaxComm:
    """Process collectives over `jax.experimental.multihost_utils`."""

    def __init__(self):
        import jax

        self.process_index = jax.process_index()
        self.process_count = jax.process_count()

    def allgather(self, x: np.ndarray) -> np.ndarray:
        """[P, *x.shape]: every process's float64 x, bit for bit."""
        from jax.experimental import multihost_utils

        out = np.asarray(multihost_utils.process_allgather(_as_int32(x), tiled=False))
        return _from_int32(out, x.shape, leading=out.shape[0])

    def broadcast(self, x: np.ndarray) -> np.ndarray:
        """Process 0's float64 x on every process, bit for bit."""
        from jax.experimental import multihost_utils

        out = np.asarray(multihost_utils.broadcast_one_to_all(_as_int32(x), is_source=self.process_index == 0))
        return _from_int32(out, x.shape)


def _as_int32(x: np.ndarray) -> np.ndarray:
    # The raw bits as int32 words (see the module docstring).
    return np.ascontiguousarray(x, np.float64).reshape(-1).view(np.int32)


def _from_int32(y: np.ndarray, shape: tuple, leading: int | None = None) -> np.ndarray:
    y = np.ascontiguousarray(y, np.int32)
    if leading is None:
        return y.reshape(-1).view(np.float64).reshape(shape)
    return y.reshape(leading, -1).view(np.float64).reshape((leading, *shape))


class SingleComm:
    """One process: the exchange is the identity."""

    process_index = 0
    process_count = 1

    def allgather(self, x):
        return x[None]

    def broadcast(self, x):
        return x


def default_comm() -> Any:
    """`JaxComm` when jax runs several processes, else the single-process stand-in."""
    import jax

    return JaxComm() if jax.process_count() > 1 else SingleComm()
