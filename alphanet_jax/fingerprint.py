"""Content digests of pytrees of arrays (supernet variables, the train state).

`leaf_digests(tree)` gives each leaf's BLAKE2b-128 over its dtype, shape and raw bytes, keyed by its
path (`jax.tree_util.keystr`): checkpoints store them to verify a restore. `fingerprint(tree)` is the
sha256 (hex) over the sorted paths and their leaf digests: two trees have the same fingerprint exactly
when they hold the same arrays under the same paths; the dict insertion order, the container (numpy or
jax, on whichever device) and the sharding do not matter; one changed bit, dtype or shape does.
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import numpy as np

__all__ = ["fingerprint", "leaf_digests"]


def _local_copy(leaf: Any) -> Any:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        # A multi-host array: every process holds a full copy when it is replicated.
        if not leaf.is_fully_replicated:
            raise ValueError("fingerprint: a leaf is sharded over several processes; gather it first")
        return leaf.addressable_shards[0].data
    return leaf


def leaf_digests(tree: Any) -> dict[str, str]:
    """{leaf path: BLAKE2b-128 hex of its dtype, shape and bytes}; one device-to-host transfer for all."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    host = jax.device_get([_local_copy(leaf) for _, leaf in flat])
    out = {}
    for (path, _), a in zip(flat, host):
        a = np.ascontiguousarray(a)
        h = hashlib.blake2b(f"{a.dtype}\0{a.shape}\0".encode(), digest_size=16)
        h.update(a.reshape(-1).view(np.uint8))
        out[jax.tree_util.keystr(path)] = h.hexdigest()
    return out


def fingerprint(tree: Any) -> str:
    """sha256 hex digest over the sorted leaf paths and their `leaf_digests`."""
    h = hashlib.sha256()
    for path, digest in sorted(leaf_digests(tree).items()):
        h.update(f"{path}\0{digest}\0".encode())
    return h.hexdigest()
