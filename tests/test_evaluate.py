"""BN calibration and evaluation (alphanet_jax.evaluate) on the tiny space, 8 simulated devices."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alphanet_jax import evaluate as E
from alphanet_jax import layers
from alphanet_jax.export import extract_subnet
from alphanet_jax.flops import count_flops, count_params
from alphanet_jax.mesh import make_mesh
from alphanet_jax.search_space import SubnetConfig, get_space
from alphanet_jax.supernet import Supernet, init_variables

SPACE = get_space("tiny")
BATCH = 16  # global batch: 2 examples per device on the 8-device mesh

# A subnet with inactive stem/stage channels, skipped blocks and a 3x3 kernel, resized 32 -> 16 in-model.
SUB_A = SubnetConfig(resolution=16, width=[8, 16, 16, 32, 48], depth=[1, 2, 1], kernel_size=[3, 5, 3],
                     expand_ratio=[1, 3, 2])
SUBS_32 = [SubnetConfig(resolution=24, width=[16, 8, 24, 24, 64], depth=[2, 1, 2], kernel_size=[5, 3, 5],
                        expand_ratio=[1, 2, 3]),
           SubnetConfig(resolution=24, width=[8, 8, 16, 24, 48], depth=[1, 1, 1], kernel_size=[3, 3, 3],
                        expand_ratio=[1, 2, 2]),
           SubnetConfig(resolution=24, width=[16, 16, 24, 32, 64], depth=[2, 2, 2], kernel_size=[5, 5, 5],
                        expand_ratio=[1, 3, 3])]


@pytest.fixture(scope="module")
def setup():
    model = Supernet(space=SPACE)
    v = jax.device_get(init_variables(SPACE, seed=0))
    rng = np.random.default_rng(0)

    # Non-trivial BN affine parameters (init has zero gamma on project BNs) and distinctive stored
    # statistics, so "inactive entries keep their values" is a real check.
    def perturb(path, x):
        name = jax.tree_util.keystr(path)
        if "_bn" in name and "scale" in name:
            return rng.uniform(0.5, 1.5, x.shape).astype(np.float32)
        if "_bn" in name and "bias" in name:
            return rng.normal(0, 0.1, x.shape).astype(np.float32)
        return np.asarray(x)

    params = jax.tree_util.tree_map_with_path(perturb, v["params"])
    stats = jax.tree.map(lambda x: (rng.uniform(0.5, 2.0, x.shape) if np.all(x == 1)
                                    else rng.normal(0, 0.2, x.shape)).astype(np.float32), v["batch_stats"])
    variables = {"params": params, "batch_stats": stats}
    calib = [dict(image=rng.normal(size=(BATCH, 32, 32, 3)).astype(np.float32),
                  label=rng.integers(0, 10, BATCH).astype(np.int32)) for _ in range(3)]
    return dict(model=model, variables=variables, calib=calib, mesh=make_mesh(), rng=rng)


def _np_moments(y):
    y = np.asarray(y, np.float64)
    return y.mean(axis=(0, 1, 2)), y.var(axis=(0, 1, 2), ddof=1)


def test_calibration_matches_numpy_stem_statistics(setup):
    model, v, calib, mesh = setup["model"], setup["variables"], setup["calib"], setup["mesh"]
    cal = E.calibrate_bn(model, v, SUB_A, calib, mesh=mesh)
    w = SUB_A.width[0]
    kernel = jnp.asarray(v["params"]["stem"]["kernel"][..., :w])
    means, vars_ = [], []
    for b in calib:
        x = layers.resize_bicubic(jnp.asarray(b["image"]), SUB_A.resolution)
        y = layers.conv2d(x, kernel, SPACE.stem_stride)
        m, s = _np_moments(y)
        means.append(m)
        vars_.append(s)
    got = jax.device_get(cal["batch_stats"]["stem_bn"])
    np.testing.assert_allclose(got["mean"][:w], np.mean(means, 0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["var"][:w], np.mean(vars_, 0), rtol=1e-4, atol=1e-6)
    # Inactive channels and blocks keep their stored statistics bit for bit.
    old = v["batch_stats"]
    np.testing.assert_array_equal(got["mean"][w:], old["stem_bn"]["mean"][w:])
    np.testing.assert_array_equal(got["var"][w:], old["stem_bn"]["var"][w:])
    # Stage mb1 (blocks 0-1) runs depth 1: block1 is inactive.
    assert SPACE.stage_blocks(0) == range(0, 2) and SUB_A.depth[0] == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(cal["batch_stats"]["block1"]), old["block1"])
    # An infinite iterator with num_batches gives the same result.
    again = E.calibrate_bn(model, v, SUB_A, itertools.cycle(calib), mesh=mesh, num_batches=len(calib))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(again["batch_stats"]),
                 jax.device_get(cal["batch_stats"]))
    # Params are untouched.
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(cal["params"]), v["params"])


def test_calibrated_supernet_equals_static_export(setup):
    """Every BN of the exported subnet, calibrated by hand (mean of per-batch train-mode stats),
    equals the sliced calibrated supernet; and the eval logits agree."""
    model, v, calib, mesh = setup["model"], setup["variables"], setup["calib"], setup["mesh"]
    cal = jax.device_get(E.calibrate_bn(model, v, SUB_A, calib, mesh=mesh))
    static, sv = extract_subnet(cal, SUB_A, SPACE)

    @jax.jit
    def batch_stats(variables, images):
        _, new = static.apply(variables, images, train=True, mutable=["batch_stats"])
        return new["batch_stats"]

    per_batch = [jax.device_get(batch_stats(sv, jnp.asarray(b["image"]))) for b in calib]
    expect = jax.tree.map(lambda *xs: np.mean(np.stack(xs).astype(np.float64), 0), *per_batch)
    flat_e = jax.tree_util.tree_flatten_with_path(expect)[0]
    flat_g = dict(jax.tree_util.tree_flatten_with_path(sv["batch_stats"])[0])
    assert len(flat_e) == len(flat_g) > 10
    for path, e in flat_e:
        np.testing.assert_allclose(flat_g[path], e, rtol=2e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))

    images = jnp.asarray(np.concatenate([b["image"] for b in calib[:2]]))
    masked = jax.jit(lambda vv, x: model.apply(vv, x, SUB_A, train=False))(cal, images)
    exported = jax.jit(lambda vv, x: static.apply(vv, x))(sv, images)
    np.testing.assert_allclose(masked, exported, rtol=1e-4, atol=1e-4)


def test_evaluation_counts_are_exact_with_padding(setup):
    """37 examples, global batch 16 over 8 devices: 3 batches, the last with 11 masked pads."""
    model, v, calib, mesh, rng = setup["model"], setup["variables"], setup["calib"], setup["mesh"], setup["rng"]
    sub = SUBS_32[0]
    cal = E.calibrate_bn(model, v, sub, calib, mesh=mesh)
    n = 37
    images = rng.normal(size=(n, 32, 32, 3)).astype(np.float32)
    logits = np.asarray(jax.jit(lambda vv, x: model.apply(vv, x, sub, train=False))(cal, images), np.float64)
    labels = rng.integers(0, 10, n).astype(np.int32)
    labels[::3] = logits[::3].argmax(-1)  # plenty of top-1 hits
    # Padding: labels equal to the prediction, so counting a pad would change top-1.
    pad = 3 * BATCH - n
    pad_images = rng.normal(size=(pad, 32, 32, 3)).astype(np.float32)
    pad_logits = np.asarray(jax.jit(lambda vv, x: model.apply(vv, x, sub, train=False))(cal, pad_images))
    all_images = np.concatenate([images, pad_images])
    all_labels = np.concatenate([labels, pad_logits.argmax(-1).astype(np.int32)])
    mask = np.arange(3 * BATCH) < n
    batches = [dict(image=all_images[i:i + BATCH], label=all_labels[i:i + BATCH], mask=mask[i:i + BATCH])
               for i in range(0, 3 * BATCH, BATCH)]
    res = E.evaluate(model, cal, sub, batches, mesh=mesh)

    order = np.argsort(-logits, axis=-1, kind="stable")
    c1 = int(np.sum(order[:, 0] == labels))
    c5 = int(np.sum(np.any(order[:, :5] == labels[:, None], axis=-1)))
    ce = np.mean(np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
                 - logits[np.arange(n), labels])
    assert res["count"] == n and isinstance(res["count"], int)
    assert res["correct1"] == c1 and res["correct5"] == c5
    assert res["top1"] == 100.0 * c1 / n
    assert res["top5"] == 100.0 * c5 / n
    assert res["loss"] == pytest.approx(ce, rel=1e-5)
    assert 0 < c1 < n


def test_one_program_per_resolution(setup):
    """Three subnets at r=24 and two at r=16: one calibration and one evaluation program per resolution."""
    model, v, calib, mesh = setup["model"], setup["variables"], setup["calib"], setup["mesh"]
    ev = E.get_evaluator(model, mesh)
    assert E.get_evaluator(Supernet(space=SPACE), mesh) is ev  # cached per (model, mesh)
    eval_batches = [dict(b, mask=np.ones(BATCH, bool)) for b in calib[:2]]
    evaluate_fn = E.make_evaluate_fn(model, v, lambda: iter(calib), lambda: iter(eval_batches), mesh=mesh,
                                     num_calib_batches=2)
    rows = [evaluate_fn(s) for s in SUBS_32]
    rows.append(E.calibrate_and_evaluate(model, v, SUB_A, calib, eval_batches, mesh=mesh))
    rows.append(evaluate_fn(SUB_A.replace(depth=(2, 2, 2))))
    assert ev.num_compiled() == {"calibrate": 2, "evaluate": 2}
    for s, r in zip(SUBS_32 + [SUB_A], rows):
        assert r["subnet"] == s.to_dict() and r["resolution"] == s.resolution
        assert r["mflops"] == count_flops(s, SPACE) and r["params"] == count_params(s, SPACE)
        assert r["count"] == 2 * BATCH and 0 <= r["top1"] <= r["top5"] <= 100 and r["seconds"] > 0
    assert len({r["loss"] for r in rows}) == len(rows)  # different subnets, different results


def test_calibration_needs_batches(setup):
    with pytest.raises(ValueError, match="no batches"):
        E.calibrate_bn(setup["model"], setup["variables"], SUB_A, [], mesh=setup["mesh"])
