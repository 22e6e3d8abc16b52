"""Ghost (virtual-batch) BN, `model.bn_group_size` (issue 17.1): training-mode BN statistics over groups of
g consecutive examples of a device's batch, as the reference's per-GPU BN over 32 images.

* layers: a group of g normalises exactly as g examples on their own (against the float64 NumPy BN of
  test_layers_independent, per group), inactive channels, the returned statistics, errors;
* supernet: g on a batch of k*g gives the logits and gradients of k separate runs of g; the masked
  supernet equals the static subnet with grouping; one compiled program per resolution still;
* config: alphanet.py sets 32, calibration/evaluation models do not group, errors name the numbers.
(The SandwichStep check, 1 device grouped vs a k-device mesh, is in test_train.py.)
"""

import functools
import pathlib
import random
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `configs` is a directory of the repo, not an installed package
    sys.path.insert(0, str(ROOT))

from alphanet_jax import config_check, errors, export, layers, sampling, supernet, train  # noqa: E402
from alphanet_jax import search_space as ss  # noqa: E402
from alphanet_jax.subnet_encoding import encode  # noqa: E402
from configs import alphanet as alphanet_config  # noqa: E402
from configs import quickstart  # noqa: E402
from test_layers_independent import BN_EPS, EPS32, _np_batch_norm  # noqa: E402

TINY = ss.get_space("tiny")


def _bn_inputs(n, h, w, c, seed):
    rng = np.random.default_rng(seed)
    x = (rng.uniform(-2, 2, c) + rng.uniform(0.5, 2, c) * rng.normal(size=(n, h, w, c))).astype(np.float32)
    p = {"scale": rng.uniform(-2, 2, c).astype(np.float32), "bias": rng.uniform(-2, 2, c).astype(np.float32)}
    s = {"mean": rng.normal(size=c).astype(np.float32), "var": rng.uniform(0.5, 2, c).astype(np.float32)}
    return x, p, s


@pytest.mark.parametrize("n,g,h,active", [(6, 2, 3, 3), (8, 4, 1, 5), (4, 1, 3, 2)])
def test_each_group_is_normalised_as_a_batch_of_its_own(n, g, h, active):
    c = 5
    x, p, s = _bn_inputs(n, h, h, c, seed=n + g)
    mask = layers.channel_mask(active, c)
    y, new = layers.batch_norm(jnp.asarray(x), p, s, mask, train=True, eps=BN_EPS, group_size=g)
    y = np.asarray(y)
    assert y.shape == x.shape and y.dtype == np.float32
    m = g * h * h
    tol = 8 * m * EPS32 * 6
    means, varis = [], []
    for i in range(0, n, g):  # the float64 NumPy BN of the spec, per group
        y_ref, mean_ref, var_ref = _np_batch_norm(x[i:i + g], p["scale"], p["bias"], s["mean"], s["var"], active)
        np.testing.assert_allclose(y[i:i + g, ..., :active], y_ref[..., :active], rtol=tol, atol=tol * 3)
        means.append(mean_ref)
        varis.append(var_ref)
        # The same float32 arithmetic as BN on the group alone.
        y_alone, _ = layers.batch_norm(jnp.asarray(x[i:i + g]), p, s, mask, train=True, eps=BN_EPS)
        np.testing.assert_allclose(y[i:i + g], np.asarray(y_alone), rtol=1e-6, atol=1e-6)
    assert np.all(y[..., active:] == 0.0), "inactive channels must be exactly zero"
    # Train mode returns the average over the groups of each group's mean and unbiased variance
    # (what calibrating on the groups as separate batches gives); inactive channels keep the stored ones.
    np.testing.assert_allclose(np.asarray(new["mean"])[:active], np.mean(means, 0)[:active], rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(new["var"])[:active], np.mean(varis, 0)[:active], rtol=1e-4)
    assert np.array_equal(np.asarray(new["mean"])[active:], s["mean"][active:])
    assert np.array_equal(np.asarray(new["var"])[active:], s["var"][active:])


def test_group_of_the_whole_batch_and_eval_mode_are_unchanged():
    x, p, s = _bn_inputs(4, 3, 3, 4, seed=0)
    mask = layers.channel_mask(3, 4)
    for train_mode in (True, False):
        want = layers.batch_norm(jnp.asarray(x), p, s, mask, train=train_mode, eps=BN_EPS)
        for g in (0, 4) if train_mode else (0, 2, 3):  # eval mode uses the stored statistics: no grouping
            got = layers.batch_norm(jnp.asarray(x), p, s, mask, train=train_mode, eps=BN_EPS, group_size=g)
            assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


def test_group_errors_name_the_numbers():
    x, p, s = _bn_inputs(6, 2, 2, 3, seed=1)
    mask = layers.channel_mask(3, 3)
    with pytest.raises(ValueError, match=r"batch of 6 .*group size 4"):
        layers.batch_norm(jnp.asarray(x), p, s, mask, train=True, eps=BN_EPS, group_size=4)
    with pytest.raises(ValueError, match="sync_bn"):
        layers.batch_norm(jnp.asarray(x), p, s, mask, train=True, eps=BN_EPS, group_size=2, axis_name="data")


@pytest.fixture(scope="module")
def tiny_vars():
    v = supernet.init_variables(TINY, seed=4)
    rng = np.random.default_rng(0)

    def lively(path, x):  # non-trivial BN affine (init has zero gamma on project BNs) and stored stats
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return rng.uniform(0.5, 1.5, x.shape).astype(np.float32)
        if "_bn" in name and "bias" in name:
            return rng.normal(0, 0.1, x.shape).astype(np.float32)
        return x

    return {"params": jax.tree_util.tree_map_with_path(lively, v["params"]), "batch_stats": v["batch_stats"]}


def test_supernet_groups_equal_separate_batches_logits_and_gradients(tiny_vars):
    """g = 2 on a batch of 4 x 2: the logits and gradients of 4 separate train-mode runs of 2."""
    k, g = 4, 2
    x = jax.random.normal(jax.random.PRNGKey(1), (k * g, 16, 16, 3))
    labels = jnp.arange(k * g) % TINY.num_classes
    grouped = supernet.Supernet(space=TINY, bn_group_size=g)
    plain = supernet.Supernet(space=TINY)
    bs = tiny_vars["batch_stats"]

    def loss(params, x, y, enc, model):
        z = model.apply({"params": params, "batch_stats": bs}, x, enc, train=True)
        return jnp.sum(jax.nn.log_softmax(z)[jnp.arange(y.shape[0]), y]), z

    one = jax.jit(jax.value_and_grad(functools.partial(loss, model=grouped), has_aux=True))
    sep = jax.jit(jax.vmap(jax.value_and_grad(functools.partial(loss, model=plain), has_aux=True),
                           in_axes=(None, 0, 0, None)))
    whole = jax.jit(lambda p, x, enc: plain.apply({"params": p, "batch_stats": bs}, x, enc, train=True))
    rng = random.Random(5)
    subnets = [TINY.max_subnet(), TINY.min_subnet(), sampling.sample_subnet(TINY, rng)]
    for s in subnets:
        enc = encode(s, TINY)
        (l_g, z_g), d_g = one(tiny_vars["params"], x, labels, enc)
        (l_s, z_s), d_s = sep(tiny_vars["params"], x.reshape(k, g, 16, 16, 3), labels.reshape(k, g), enc)
        np.testing.assert_allclose(np.asarray(z_g), np.asarray(z_s).reshape(k * g, -1), rtol=1e-5, atol=1e-5)
        assert float(l_g) == pytest.approx(float(jnp.sum(l_s)), rel=1e-5)
        d_s = jax.tree.map(lambda a: jnp.sum(a, axis=0), d_s)
        scale = max(float(np.abs(a).max()) for a in jax.tree.leaves(d_s))
        for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(d_g)[0], jax.tree.leaves(d_s)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * scale,
                                       err_msg=jax.tree_util.keystr(path))
        # ... and not those of one batch of 8.
        assert float(jnp.abs(whole(tiny_vars["params"], x, enc) - z_g).max()) > 1e-3
    # One program per resolution, whatever the subnets.
    assert one._cache_size() == sep._cache_size() == len({s.resolution for s in subnets})


def test_masked_equals_static_with_groups_and_one_program_per_resolution(tiny_vars):
    g = 2
    model = supernet.Supernet(space=TINY, bn_group_size=g)
    traces = []

    def fn(v, x, enc):
        traces.append(enc.resolution)
        return model.apply(v, x, enc, train=True, mutable=["batch_stats"])

    f = jax.jit(fn)
    rng = random.Random(9)
    subnets = [TINY.max_subnet(), TINY.min_subnet()] + [sampling.sample_subnet(TINY, rng) for _ in range(2)]
    x = jax.random.normal(jax.random.PRNGKey(3), (6, 32, 32, 3))
    for s in subnets:
        z, new = f(tiny_vars, x, encode(s, TINY))
        m, sv = export.extract_subnet(tiny_vars, s, TINY)
        m = m.clone(bn_group_size=g)
        zs, news = jax.jit(lambda v, x, m=m: m.apply(v, x, train=True, mutable=["batch_stats"]))(sv, x)
        err = float(jnp.max(jnp.abs(z - zs)) / (jnp.max(jnp.abs(zs)) + 1e-6))
        assert err < 1e-5, (s, err)
        # The statistics returned (per-group averages) are those of the static subnet, sliced.
        want = export.slice_variables({"params": tiny_vars["params"], "batch_stats": new["batch_stats"]}, s, TINY)
        for a, b in zip(jax.tree.leaves(want["batch_stats"]), jax.tree.leaves(news["batch_stats"])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    assert sorted(traces) == sorted({s.resolution for s in subnets})  # one program per resolution
    with pytest.raises(ValueError, match="batch of 5 .*group size 2"):
        f(tiny_vars, x[:5], encode(subnets[0], TINY))


# ----------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------


def test_alphanet_config_groups_32_and_only_training_groups():
    c = alphanet_config.get_config()
    assert c.model.bn_group_size == 32 and c.model.sync_bn is False
    assert quickstart.get_config().model.bn_group_size == 0
    assert train.make_model(c, TINY).bn_group_size == 32
    # Calibration, evaluation, search and export: statistics over whole batches, as the reference calibrates.
    assert train.make_model(c, TINY, for_training=False).bn_group_size == 0
    config_check.validate_config(c, ["train"])


def test_config_errors_name_the_per_device_batch_and_the_group_size():
    c = alphanet_config.get_config()
    c.batch_size = 2048
    c.mesh.data = 8  # per-device batch 256
    c.model.bn_group_size = 48
    with pytest.raises(errors.ConfigError, match=r"per-device batch 256 .*2048 / 8 devices.*bn_group_size = 48"):
        config_check.validate_config(c, ["train"])
    config_check.validate_config(c, ["evaluate"])  # grouping is for training only
    with pytest.raises(errors.ConfigError, match=r"per-device batch 256 .*bn_group_size = 48"):
        train.check_bn_group_size(c, 8)  # what train_and_evaluate checks once the mesh exists
    c.mesh.data = -1  # devices unknown before jax starts: the global batch must divide at least
    c.batch_size = 2056
    with pytest.raises(errors.ConfigError, match=r"batch_size = 2056 .*bn_group_size = 48"):
        config_check.validate_config(c, ["train"])
    c.model.bn_group_size = 32
    c.model.sync_bn = True
    with pytest.raises(errors.ConfigError, match="sync_bn"):
        config_check.validate_config(c, ["train"])
    c.model.sync_bn = False
    for bad in (-1, -32):  # (ConfigDict itself refuses non-integers)
        c.model.bn_group_size = bad
        with pytest.raises(errors.ConfigError, match="bn_group_size"):
            config_check.validate_config(c, ["train"])
