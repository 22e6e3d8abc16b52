"""alphanet_jax.fingerprint: a content hash of a pytree of arrays."""

import jax
import jax.numpy as jnp
import numpy as np

from alphanet_jax.fingerprint import fingerprint


def tree():
    return {"params": {"conv": {"kernel": np.arange(12, dtype=np.float32).reshape(3, 4)},
                       "bn": {"scale": np.ones(4, np.float32)}},
            "batch_stats": {"bn": {"mean": np.zeros(4, np.float32)}}}


def test_same_content_same_fingerprint_whatever_the_container_or_order():
    t = tree()
    fp = fingerprint(t)
    assert len(fp) == 64 and fp == fingerprint(tree())
    reordered = {"batch_stats": t["batch_stats"], "params": {"bn": t["params"]["bn"], "conv": t["params"]["conv"]}}
    assert fingerprint(reordered) == fp
    assert fingerprint(jax.tree_util.tree_map(jnp.asarray, t)) == fp  # on a device, as jax arrays
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    replicated = jax.device_put(t, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    assert fingerprint(replicated) == fp


def test_any_change_of_a_value_dtype_shape_or_path_changes_it():
    fp = fingerprint(tree())
    t = tree()
    t["params"]["conv"]["kernel"][2, 3] = np.nextafter(np.float32(11), np.float32(12))  # one ulp
    assert fingerprint(t) != fp
    t = tree()
    t["batch_stats"]["bn"]["mean"] = t["batch_stats"]["bn"]["mean"].astype(np.float16)
    assert fingerprint(t) != fp
    t = tree()
    t["params"]["conv"]["kernel"] = t["params"]["conv"]["kernel"].reshape(4, 3)
    assert fingerprint(t) != fp
    t = tree()
    t["params"]["bn2"] = t["params"].pop("bn")
    assert fingerprint(t) != fp


def test_bfloat16_and_scalars():
    a = {"w": jnp.ones((2, 2), jnp.bfloat16), "s": np.float32(3.0)}
    assert fingerprint(a) == fingerprint(jax.device_get(a))
    assert fingerprint(a) != fingerprint({"w": jnp.ones((2, 2), jnp.float32), "s": np.float32(3.0)})
