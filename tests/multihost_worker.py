"""One process of the 2-process training test (tests/test_multihost.py); not a test module itself.

  python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR OUTDIR [AS_HOSTS]

Trains the tiny quickstart supernet through `train.train_and_evaluate` (jax.distributed on
127.0.0.1:PORT, 4 CPU devices per process, one shared WORKDIR) for 8 steps, saving every 4, and
exchanging the stop flags every 3 steps (`stop_check_every`; and at the save steps), with SIGTERM
delivered to the LAST process only, during its fifth step, a step without an exchange: every process
must go on to step 6, the next exchange, and stop there and save it together. Writes
OUTDIR/proc{ID}.npz (final params, flattened) and OUTDIR/proc{ID}.json (what this host fed the
model, the subnets it trained, the steps after which it exchanged stop flags, the summary).

With NUM_PROCESSES=1 and AS_HOSTS=2 it is the reference run: one process with all 8 devices, no
jax.distributed, fed the global batches that 2 processes read together (their shards, concatenated).
"""

import hashlib
import json
import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8 // int(sys.argv[2]))  # 8 devices in all
jax.config.update("jax_disable_most_optimizations", True)  # compile time dominates, as in tests/conftest.py

import numpy as np  # noqa: E402

from alphanet_jax import data as data_lib  # noqa: E402
from alphanet_jax import mesh as mesh_lib  # noqa: E402
from alphanet_jax import train  # noqa: E402
from alphanet_jax.search_space import get_space  # noqa: E402
from configs import quickstart  # noqa: E402

TOTAL_STEPS = 8
SIGTERM_BEFORE_STEP = 4  # 0-based: the last process is "preempted" during its fifth step
STOP_STEP = 6  # the next exchange of stop flags (stop_check_every=3), where every process stops


def main(pid: int, nproc: int, port: int, workdir: str, outdir: str, as_hosts: int = 0) -> None:
    c = quickstart.get_config()
    c.batch_size = 16  # 2 per device, 8 per host
    c.total_steps = TOTAL_STEPS
    # Seed 27: any seed would do (the sequence itself is what the test checks, not its content); the
    # programs of both resolutions are compiled before the first step (precompile) whatever it draws.
    c.seed = 27
    c.data.num_workers = 1
    c.data_prefetch = 2
    c.checkpoint.every_steps = 4
    c.stop_check_every = 3
    c.eval.at_end = False
    c.log_every_steps = 100  # the host waits for the device only at saves (4) and exchanges (3, 6)
    if nproc > 1:
        c.distributed.coordinator_address = f"127.0.0.1:{port}"
        c.distributed.num_processes = nproc
        c.distributed.process_id = pid

    fed, trained, iterators, exchanges = [], [], [], []

    real_to_global = mesh_lib.to_global
    real_make_train_iterator = data_lib.make_train_iterator
    hosts = [real_make_train_iterator(c.data, batch_size=c.batch_size // as_hosts, seed=c.seed, process_index=i,
                                      process_count=as_hosts) for i in range(as_hosts)]

    def to_global(batch, mesh):  # this host's slice of every global batch
        if hosts:  # the reference run: what `as_hosts` processes read instead
            parts = [next(h) for h in hosts]
            batch = {k: np.concatenate([b[k] for b in parts]) for k in batch}
        fed.append({"labels": np.asarray(batch["label"]).tolist(),
                    "images_sha1": hashlib.sha1(np.ascontiguousarray(batch["image"]).tobytes()).hexdigest()})
        return real_to_global(batch, mesh)

    real_subnets = train.sandwich_subnets

    def subnets(space, seed, step, n):
        # A single process checks its flag after every step: the reference run is signalled during the
        # step the processes stop after.
        if pid == nproc - 1 and step == (SIGTERM_BEFORE_STEP if nproc > 1 else STOP_STEP - 1):
            signal.raise_signal(signal.SIGTERM)
        out = real_subnets(space, seed, step, n)
        trained.append({"step": step, "subnets": [s.to_dict() for s in out]})
        return out

    def make_train_iterator(*args, **kwargs):
        it = real_make_train_iterator(*args, **kwargs)
        iterators.append(it)
        return it

    real_any_process = mesh_lib.any_process

    def any_process(flag):  # the steps after which this process exchanges its stop flag
        exchanges.append(len(trained))
        return real_any_process(flag)

    mesh_lib.to_global = to_global
    mesh_lib.any_process = any_process
    train.sandwich_subnets = subnets
    data_lib.make_train_iterator = make_train_iterator

    out = train.train_and_evaluate(c, workdir)
    for h in hosts:
        h.close()

    params = jax.device_get(out["state"]["params"])  # replicated: every process holds all of it
    flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    np.savez(os.path.join(outdir, f"proc{pid}.npz"), **flat)

    # The newest checkpoint, read back by every process (a multi-process Orbax restore).
    restored, ckpt_step = train.restore_variables(c, workdir)
    restored = jax.device_get(restored["params"])
    restored_equal = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)))

    it = iterators[-1]  # the iterator that fed training (the first one only probed steps per epoch)
    space = get_space(c.space)
    fallback = _restore_with_the_stop_step_corrupted_on_the_last_process(c, space, workdir, pid, nproc)
    report = {
        "process_index": jax.process_index(), "process_count": jax.process_count(),
        "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
        "interrupted": out["interrupted"], "steps": out["steps"], "ckpt_step": ckpt_step,
        "restored_equal": restored_equal,
        "fed": fed, "trained": trained, "exchanges": exchanges,
        "iterator": {"process_index": it.process_index, "process_count": it.process_count,
                     "examples": it.epoch_indices(0)[:out["steps"] * it.batch_size].tolist()},
        "subnet_sequence": [[s.to_dict() for s in real_subnets(space, c.seed, step, 4)] for step in range(8)],
        "metrics": {k: v for k, v in out.items() if isinstance(v, (int, float))},
        "fallback": fallback,
    }
    with open(os.path.join(outdir, f"proc{pid}.json"), "w") as f:
        json.dump(report, f)
    if nproc > 1:
        jax.distributed.shutdown()


def _restore_with_the_stop_step_corrupted_on_the_last_process(c, space, workdir, pid, nproc) -> dict:
    """STOP_STEP fails verification on the last process only (its digests read differently there): every
    process must skip it and restore the save before it (4), and it is moved aside once."""
    from alphanet_jax import checkpoint as ckpt_lib

    mesh = mesh_lib.make_mesh(c.mesh.data)
    model, tx = train.make_model(c, space), train.make_optimizer(c, lambda t: 0.0)
    ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=c.checkpoint.keep, async_save=False)
    lines = []
    if pid == nproc - 1:
        real_restore, real_digests = ck.restore, ckpt_lib.leaf_digests

        def restore(step, *args, **kwargs):
            if step == STOP_STEP:  # what this process reads back differs from what was saved
                ckpt_lib.leaf_digests = lambda tree: {k: "0" * 32 for k in real_digests(tree)}
            try:
                return real_restore(step, *args, **kwargs)
            finally:
                ckpt_lib.leaf_digests = real_digests

        ck.restore = restore
    try:
        step, *_ = ck.restore_newest(train.abstract_state(model, tx, mesh), train.checkpoint_meta(c, space),
                                     log=lines.append)
    finally:
        ck.close()
    return {"step": step, "lines": lines}


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], *map(int, sys.argv[6:]))
