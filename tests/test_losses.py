"""Tests for alphanet_jax.losses against a NumPy port of AlphaNet's loss_ops.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, assume
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jax.sharding import PartitionSpec as P

from alphanet_jax import losses as L

PROPERTY = settings(max_examples=50, deadline=None, derandomize=True)
ALPHAS = [-2.0, -1.0, -0.5, -0.0005, 0.0, 0.002, 0.25, 0.5, 0.75, 0.9995, 1.0, 1.5, 2.0]


# --------------------------------------------------------------------------------------
# NumPy port of the reference (facebookresearch/AlphaNet loss_ops.py), written as the
# reference computes it (w = p / q from softmax probabilities, pow, clamp).
# --------------------------------------------------------------------------------------
def np_log_softmax(x):
    x = np.asarray(x)
    m = np.max(x, axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def np_softmax(x):
    return np.exp(np_log_softmax(x))


def ref_f_divergence(q_logits, p_logits, alpha, iw_clip=5.0, dtype=np.float64):
    """Returns (loss, grad_loss, d grad_loss / d q_logits = q (S - rho)), per example."""
    q_logits = np.asarray(q_logits, dtype)
    p_logits = np.asarray(p_logits, dtype)
    q = np_softmax(q_logits)
    p = np_softmax(p_logits)
    log_q = np_log_softmax(q_logits)
    with np.errstate(all="ignore"):
        w = p / q
        if abs(alpha) < 1e-3:
            w = np.clip(w, 0, iw_clip)
            f = -np.log(w)
            f_base = 0.0
            rho = np.log(w) - 1.0
        elif abs(alpha - 1.0) < 1e-3:
            f = w * np.log(w)
            f_base = 0.0
            rho = w
        else:
            iw_alpha = np.clip(np.power(w, alpha), 0, iw_clip)
            f = iw_alpha / alpha / (alpha - 1.0)
            f_base = 1.0 / alpha / (alpha - 1.0)
            rho = iw_alpha / alpha + f_base
        loss = np.sum(q * (f - f_base), axis=-1)
        grad_loss = -np.sum(q * rho * log_q, axis=-1)
        s = np.sum(q * rho, axis=-1, keepdims=True)
        grad = q * (s - rho)
    return loss, grad_loss, grad


def ref_adaptive(q_logits, p_logits, alpha_min=-1.0, alpha_max=1.0, iw_clip=5.0):
    """Per-example (chosen divergence, chosen surrogate grad_loss, its gradient, pick_left)."""
    ll, gl_left, g_left = ref_f_divergence(q_logits, p_logits, alpha_min, iw_clip)
    lr, gl_right, g_right = ref_f_divergence(q_logits, p_logits, alpha_max, iw_clip)
    ind = ll > lr
    return (
        np.where(ind, ll, lr),
        np.where(ind, gl_left, gl_right),
        np.where(ind[..., None], g_left, g_right),
        ind,
    )


def numeric_grad(fn, x, h=1e-6):
    """Central differences of the scalar fn at float64 x."""
    x = np.asarray(x, np.float64)
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[idx] = h
        g[idx] = (fn(x + e) - fn(x - e)) / (2 * h)
    return g


def jgrad(fn, s, t):
    """Gradients of sum(fn(s, t)) with respect to both logits."""
    return jax.grad(lambda a, b: jnp.sum(fn(a, b)), argnums=(0, 1))(s, t)


def div(alpha, iw_clip=5.0):
    return functools.partial(L.alpha_divergence, alpha=alpha, iw_clip=iw_clip)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def small_pair(rng, shape=(4, 7), spread=0.3):
    """Student/teacher logits whose softmaxes are close (no clipping for moderate alpha)."""
    s = rng.normal(size=shape)
    t = s + spread * rng.normal(size=shape)
    return s, t


# --------------------------------------------------------------------------------------
# Closed-form values
# --------------------------------------------------------------------------------------
def test_closed_forms(rng):
    s, t = small_pair(rng)
    q, p = np_softmax(s), np_softmax(t)
    assert np.all(q / p < 5) and np.all(p / q < 5)  # nothing clipped
    kl_pq = np.sum(p * np.log(p / q), -1)
    kl_qp = np.sum(q * np.log(q / p), -1)
    chi = 0.5 * np.sum(q * (q / p - 1), -1)
    hellinger = 4 * (1 - np.sum(np.sqrt(p * q), -1))
    np.testing.assert_allclose(L.alpha_divergence(s, t, 1.0), kl_pq, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(L.alpha_divergence(s, t, 0.0), kl_qp, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(L.alpha_divergence(s, t, -1.0), chi, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(L.alpha_divergence(s, t, 0.5), hellinger, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        L.adaptive_alpha_divergence(s, t), np.maximum(chi, kl_pq), rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        L.soft_cross_entropy(s, t), -np.sum(p * np.log(q), -1), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("alpha", ALPHAS)
def test_identical_logits_give_zero(alpha, rng):
    s = rng.normal(size=(3, 5)) * 10
    np.testing.assert_array_equal(L.alpha_divergence(s, s, alpha), 0.0)
    gs, gt = jgrad(div(alpha), s, s)
    np.testing.assert_allclose(gs, 0.0, atol=1e-7)
    np.testing.assert_array_equal(gt, 0.0)


def test_identical_logits_adaptive_zero(rng):
    s = rng.normal(size=(3, 5))
    np.testing.assert_array_equal(L.adaptive_alpha_divergence(s, s), 0.0)
    np.testing.assert_allclose(jgrad(L.adaptive_alpha_divergence, s, s)[0], 0.0, atol=1e-7)


# --------------------------------------------------------------------------------------
# Agreement with the NumPy reference (values and surrogate gradients)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("spread", [0.3, 4.0])  # 4.0 makes clipping active
def test_matches_reference_float64(alpha, spread, rng):
    s, t = small_pair(rng, spread=spread)
    loss, _, grad = ref_f_divergence(s, t, alpha)
    with jax.enable_x64(True):
        sj, tj = jnp.asarray(s), jnp.asarray(t)
        val = L.alpha_divergence(sj, tj, alpha)
        gs, gt = jgrad(div(alpha), sj, tj)
        assert val.dtype == jnp.float64
    np.testing.assert_allclose(val, loss, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(gs, grad, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(gt, 0.0)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_matches_reference_float32(alpha, rng):
    s, t = small_pair(rng, spread=3.0)
    loss, _, grad = ref_f_divergence(s, t, alpha)
    sj, tj = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)
    val = L.alpha_divergence(sj, tj, alpha)
    assert val.dtype == jnp.float32 and val.shape == (4,)
    np.testing.assert_allclose(val, loss, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(jgrad(div(alpha), sj, tj)[0], grad, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("alpha", [-1.5, -1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5])
def test_gradient_is_true_gradient_without_clipping(alpha, rng):
    """Finite differences of the reference value == custom gradient == q (S - rho)."""
    s, t = small_pair(rng, shape=(2, 5), spread=0.2)
    q, p = np_softmax(s), np_softmax(t)
    assert np.all(np.abs(np.log(p / q)) * abs(alpha) < np.log(5))  # no clipping
    _, _, formula = ref_f_divergence(s, t, alpha)
    fd = numeric_grad(lambda x: np.sum(ref_f_divergence(x, t, alpha)[0]), s)
    np.testing.assert_allclose(formula, fd, rtol=1e-5, atol=1e-8)
    with jax.enable_x64(True):
        gs, _ = jgrad(div(alpha), jnp.asarray(s), jnp.asarray(t))
    np.testing.assert_allclose(gs, fd, rtol=1e-5, atol=1e-8)


def ref_detached_surrogate(s, t, alpha, iw_clip=5.0):
    """The reference's grad_loss as a function of x with q and rho detached (fixed at s)."""
    q, p = np_softmax(s), np_softmax(t)
    w = p / q
    if abs(alpha) < 1e-3:
        rho = np.log(np.clip(w, 0, iw_clip)) - 1
    elif abs(alpha - 1) < 1e-3:
        rho = w
    else:
        rho = np.clip(w**alpha, 0, iw_clip) / alpha + 1 / alpha / (alpha - 1)
    return lambda x: -np.sum(q * rho * np_log_softmax(x), -1)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_surrogate_gradient_matches_autodiff_of_reference_surrogate(alpha, rng):
    """grad of the reference's -sum q rho log q (q, rho detached) is q (S - rho)."""
    s, t = small_pair(rng, spread=4.0)
    _, _, grad = ref_f_divergence(s, t, alpha)
    surrogate = ref_detached_surrogate(s, t, alpha)
    np.testing.assert_allclose(grad, numeric_grad(lambda x: surrogate(x).sum(), s), rtol=1e-5, atol=1e-7)


def test_alpha_one_gradient_is_q_minus_p(rng):
    s, t = small_pair(rng, spread=5.0)
    gs, gt = jgrad(div(1.0), jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32))
    np.testing.assert_allclose(gs, np_softmax(s) - np_softmax(t), atol=1e-6)
    np.testing.assert_array_equal(gt, 0.0)


# --------------------------------------------------------------------------------------
# Continuity at the alpha ~ 0 and alpha ~ 1 branches
# --------------------------------------------------------------------------------------
def test_branch_windows_and_continuity(rng):
    s, t = small_pair(rng, spread=0.5)
    d0 = np.asarray(L.alpha_divergence(s, t, 0.0))
    d1 = np.asarray(L.alpha_divergence(s, t, 1.0))
    g0 = jgrad(div(0.0), s, t)[0]
    g1 = jgrad(div(1.0), s, t)[0]
    # inside the windows: exactly the branch
    np.testing.assert_array_equal(L.alpha_divergence(s, t, 1e-4), d0)
    np.testing.assert_array_equal(L.alpha_divergence(s, t, -1e-4), d0)
    np.testing.assert_array_equal(L.alpha_divergence(s, t, 1 + 1e-4), d1)
    np.testing.assert_array_equal(L.alpha_divergence(s, t, 1 - 1e-4), d1)
    # just outside the windows (general formula): continuous to ~1e-3 relative
    for a, ref, gref in [(1.001e-3, d0, g0), (-1.001e-3, d0, g0), (1 + 1.001e-3, d1, g1),
                         (1 - 1.001e-3, d1, g1)]:
        np.testing.assert_allclose(L.alpha_divergence(s, t, a), ref, rtol=3e-3, atol=1e-6)
        np.testing.assert_allclose(jgrad(div(a), s, t)[0], gref, rtol=3e-3, atol=1e-5)
    # alpha = 0.01 / 0.99: close to the branch values
    np.testing.assert_allclose(L.alpha_divergence(s, t, 0.01), d0, rtol=3e-2)
    np.testing.assert_allclose(L.alpha_divergence(s, t, 0.99), d1, rtol=3e-2)


# --------------------------------------------------------------------------------------
# Adaptive alpha-divergence
# --------------------------------------------------------------------------------------
def test_adaptive_matches_reference(rng):
    s = rng.normal(size=(64, 10)) * 2
    t = s + rng.normal(size=(64, 10)) * 2
    value, surrogate, grad, ind = ref_adaptive(s, t)
    assert 0 < ind.sum() < len(ind)  # both branches are exercised
    with jax.enable_x64(True):
        sj, tj = jnp.asarray(s), jnp.asarray(t)
        out = L.adaptive_alpha_divergence(sj, tj)
        # gradient of our batch mean == gradient of the reference's mean of surrogates
        gs, gt = jax.grad(lambda a, b: L.adaptive_alpha_divergence(a, b).mean(), (0, 1))(sj, tj)
    np.testing.assert_allclose(out, value, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(gs, grad / len(s), rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(gt, 0.0)
    # reference's returned loss: mean of the chosen detached surrogates
    left, right = ref_detached_surrogate(s, t, -1.0), ref_detached_surrogate(s, t, 1.0)
    fd = numeric_grad(lambda x: np.where(ind, left(x), right(x)).mean(), s)
    np.testing.assert_allclose(gs, fd, rtol=1e-4, atol=1e-8)
    # ...but our value is the chosen divergence, not the surrogate
    assert not np.allclose(out, surrogate)


def test_adaptive_gradient_is_chosen_branch(rng):
    s = rng.normal(size=(32, 6)) * 2
    t = s + rng.normal(size=(32, 6)) * 2
    left = np.asarray(L.alpha_divergence(s, t, -1.0))
    right = np.asarray(L.alpha_divergence(s, t, 1.0))
    g_left = jgrad(div(-1.0), s, t)[0]
    g_right = jgrad(div(1.0), s, t)[0]
    pick = left > right
    assert 0 < pick.sum() < len(pick)
    np.testing.assert_array_equal(L.adaptive_alpha_divergence(s, t), np.where(pick, left, right))
    g = jgrad(L.adaptive_alpha_divergence, s, t)[0]
    np.testing.assert_allclose(g, np.where(pick[:, None], g_left, g_right), atol=1e-7)


def test_adaptive_tie_goes_to_alpha_max():
    """For p = (a, b), q = (b, a): KL(q||p) == KL(p||q) bitwise; a tie picks alpha_max."""
    s = jnp.array([[0.3, -0.4]], jnp.float32)
    t = s[:, ::-1]
    left = L.alpha_divergence(s, t, 0.0)
    right = L.alpha_divergence(s, t, 1.0)
    assert float(left[0]) == float(right[0]) > 0  # exact tie (precondition)
    g_left, g_right = jgrad(div(0.0), s, t)[0], jgrad(div(1.0), s, t)[0]
    assert not np.allclose(g_left, g_right)
    ada = functools.partial(L.adaptive_alpha_divergence, alpha_min=0.0, alpha_max=1.0)
    np.testing.assert_array_equal(ada(s, t), right)
    np.testing.assert_array_equal(jgrad(ada, s, t)[0], g_right)
    # strictly greater picks alpha_min: swap roles so that alpha_min = 1 is larger
    t2 = t.at[0, 0].add(0.1)
    ada2 = functools.partial(L.adaptive_alpha_divergence, alpha_min=1.0, alpha_max=0.0)
    l2, r2 = L.alpha_divergence(s, t2, 1.0), L.alpha_divergence(s, t2, 0.0)
    assert float(l2[0]) > float(r2[0])
    np.testing.assert_array_equal(jgrad(ada2, s, t2)[0], jgrad(div(1.0), s, t2)[0])


# --------------------------------------------------------------------------------------
# Sign of the clipped alpha = -1 divergence
# --------------------------------------------------------------------------------------
# Few distinct shapes keep the number of XLA compilations (and the runtime) small.
logit_arrays = st.sampled_from([1, 3]).flatmap(
    lambda b: st.sampled_from([2, 3, 7]).flatmap(
        lambda k: st.tuples(
            hnp.arrays(np.float64, (b, k), elements=st.floats(-12, 12)),
            hnp.arrays(np.float64, (b, k), elements=st.floats(-12, 12)),
        )
    )
)


@PROPERTY
@given(logit_arrays, st.floats(2.0, 50.0))
def test_alpha_minus_one_nonnegative_for_clip_at_least_two(pair, iw_clip):
    s, t = pair
    ref = ref_f_divergence(s, t, -1.0, iw_clip)[0]
    assert np.all(ref >= -1e-12)
    ours = np.asarray(L.alpha_divergence(s, t, -1.0, iw_clip))
    assert np.all(ours >= -1e-6)


def test_alpha_minus_one_can_be_negative_for_small_clip():
    q = np.array([[0.25, 0.75]])
    p = np.array([[0.001, 0.999]])
    s, t = np.log(q), np.log(p)
    expected = 0.5 * (0.25 * 1.5 + 0.75 * (0.75 / 0.999) - 1)  # about -0.031
    ref = ref_f_divergence(s, t, -1.0, 1.5)[0]
    ours = L.alpha_divergence(s, t, -1.0, iw_clip=1.5)
    np.testing.assert_allclose(ref, expected, rtol=1e-12)
    np.testing.assert_allclose(ours, expected, rtol=1e-5)
    assert float(ours[0]) < -0.03
    assert float(L.alpha_divergence(s, t, -1.0)[0]) > 0  # default iw_clip = 5


# --------------------------------------------------------------------------------------
# Property tests against the NumPy reference
# --------------------------------------------------------------------------------------
@PROPERTY
@given(logit_arrays, st.sampled_from(ALPHAS + [-3.0, 0.1, 3.0]), st.sampled_from([1.5, 5.0, 1e3]))
def test_property_alpha_divergence_matches_reference(pair, alpha, iw_clip):
    s, t = pair
    loss, _, grad = ref_f_divergence(s, t, alpha, iw_clip)
    assume(np.all(np.isfinite(loss)) and np.all(np.isfinite(grad)))
    with jax.enable_x64(True):
        sj, tj = jnp.asarray(s), jnp.asarray(t)
        val = L.alpha_divergence(sj, tj, alpha, iw_clip)
        gs = jgrad(div(alpha, iw_clip), sj, tj)[0]
    scale = 1.0 + np.abs(loss)
    np.testing.assert_allclose(val, loss, rtol=1e-7, atol=1e-9 * scale.max())
    np.testing.assert_allclose(gs, grad, rtol=1e-7, atol=1e-9 * (1 + np.abs(grad).max()))
    # float32 path: looser
    val32 = L.alpha_divergence(s.astype(np.float32), t.astype(np.float32), alpha, iw_clip)
    assert val32.dtype == jnp.float32
    np.testing.assert_allclose(val32, loss, rtol=1e-3, atol=1e-4 * scale.max())


@PROPERTY
@given(logit_arrays)
def test_property_adaptive_matches_reference(pair):
    s, t = pair
    value, _, grad, _ = ref_adaptive(s, t)
    left = ref_f_divergence(s, t, -1.0)[0]
    right = ref_f_divergence(s, t, 1.0)[0]
    assume(np.all(np.abs(left - right) > 1e-9 * (1 + np.abs(right))))  # no near-ties
    with jax.enable_x64(True):
        sj, tj = jnp.asarray(s), jnp.asarray(t)
        out = L.adaptive_alpha_divergence(sj, tj)
        gs = jgrad(L.adaptive_alpha_divergence, sj, tj)[0]
    np.testing.assert_allclose(out, value, rtol=1e-7, atol=1e-9 * (1 + np.abs(value).max()))
    np.testing.assert_allclose(gs, grad, rtol=1e-7, atol=1e-9 * (1 + np.abs(grad).max()))


# --------------------------------------------------------------------------------------
# Soft cross-entropy and label smoothing
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_soft_cross_entropy(temperature, rng):
    s, t = rng.normal(size=(2, 3, 6)) * 3, rng.normal(size=(2, 3, 6)) * 3
    q, p = np_softmax(s / temperature), np_softmax(t / temperature)
    expected = -np.sum(p * np.log(q), -1)  # KLLossSoft kd_loss, no T^2
    sce = functools.partial(L.soft_cross_entropy, temperature=temperature)
    np.testing.assert_allclose(sce(s, t), expected, rtol=1e-5)
    gs, gt = jgrad(sce, s, t)
    np.testing.assert_allclose(gs, (q - p) / temperature, atol=1e-6)
    np.testing.assert_array_equal(gt, 0.0)


def test_label_smoothed_cross_entropy(rng):
    logits = rng.normal(size=(5, 1000)) * 3
    labels = rng.integers(0, 1000, size=5)
    target = np.full((5, 1000), 0.1 / 1000)
    target[np.arange(5), labels] += 0.9
    assert np.isclose(target[0, labels[0]], 0.9001)
    expected = -np.sum(target * np_log_softmax(logits), -1)
    np.testing.assert_allclose(L.label_smoothed_cross_entropy(logits, labels), expected, rtol=1e-5)
    np.testing.assert_allclose(
        L.label_smoothed_cross_entropy(logits, labels, smoothing=0.0),
        -np_log_softmax(logits)[np.arange(5), labels],
        rtol=1e-5,
    )
    g = jax.grad(lambda x: L.label_smoothed_cross_entropy(x, labels).sum())(logits)
    np.testing.assert_allclose(g, np_softmax(logits) - target, atol=1e-6)
    # leading batch shape
    out = L.label_smoothed_cross_entropy(logits.reshape(5, 1, 1000), labels.reshape(5, 1))
    assert out.shape == (5, 1)


# --------------------------------------------------------------------------------------
# Transformations: jit, vmap, grad, shard_map
# --------------------------------------------------------------------------------------
ALL_LOSSES = {
    "alpha-1": div(-1.0),
    "alpha0": div(0.0),
    "alpha0.5": div(0.5),
    "alpha1": div(1.0),
    "adaptive": L.adaptive_alpha_divergence,
    "soft_ce_T2": functools.partial(L.soft_cross_entropy, temperature=2.0),
}


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_jit_vmap_grad(name, rng):
    fn = ALL_LOSSES[name]
    s = jnp.asarray(rng.normal(size=(3, 4, 6)) * 3, jnp.float32)
    t = jnp.asarray(rng.normal(size=(3, 4, 6)) * 3, jnp.float32)
    eager = fn(s, t)
    assert eager.shape == (3, 4)
    np.testing.assert_allclose(jax.jit(fn)(s, t), eager, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.vmap(fn)(s, t), eager, rtol=1e-5, atol=1e-6)
    g_eager = jgrad(fn, s, t)
    g_jit = jax.jit(functools.partial(jgrad, fn))(s, t)
    g_vmap = jax.vmap(functools.partial(jgrad, fn))(s, t)  # per-row grads
    for a, b, c in zip(g_eager, g_jit, g_vmap):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(g_eager[1], 0.0)  # teacher gets no gradient
    # a weighted cotangent reaches the right examples
    wts = jnp.arange(12.0).reshape(3, 4)
    g_w = jax.grad(lambda a: jnp.sum(wts * fn(a, t)))(s)
    np.testing.assert_allclose(g_w, wts[..., None] * g_eager[0], rtol=1e-5, atol=1e-6)


def test_shard_map(rng):
    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    s = jnp.asarray(rng.normal(size=(2 * n, 10)) * 3, jnp.float32)
    t = jnp.asarray(rng.normal(size=(2 * n, 10)) * 3, jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, size=2 * n))

    def per_shard(s, t, y):
        # value and gradient computed locally on each shard
        loss, g = jax.value_and_grad(
            lambda a: jnp.sum(L.adaptive_alpha_divergence(a, t) + L.label_smoothed_cross_entropy(a, y))
        )(s)
        return L.adaptive_alpha_divergence(s, t), g, loss[None]

    sharded = jax.jit(
        jax.shard_map(
            per_shard,
            mesh=mesh,
            in_specs=(P("data"), P("data"), P("data")),
            out_specs=(P("data"), P("data"), P("data")),
        )
    )
    val, g, per_dev = sharded(s, t, labels)
    np.testing.assert_allclose(val, L.adaptive_alpha_divergence(s, t), rtol=1e-6)
    g_full = jax.grad(
        lambda a: jnp.sum(L.adaptive_alpha_divergence(a, t) + L.label_smoothed_cross_entropy(a, labels))
    )(s)
    np.testing.assert_allclose(g, g_full, rtol=1e-5, atol=1e-7)
    assert per_dev.shape == (n,)


# --------------------------------------------------------------------------------------
# Dtypes and extreme inputs
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_low_precision_inputs_give_float32(dtype, name, rng):
    fn = ALL_LOSSES[name]
    s = jnp.asarray(rng.normal(size=(4, 8)) * 3, dtype)
    t = jnp.asarray(rng.normal(size=(4, 8)) * 3, dtype)
    out = fn(s, t)
    assert out.dtype == jnp.float32
    # same as computing on the (exactly representable) upcast values
    np.testing.assert_allclose(out, fn(s.astype(jnp.float32), t.astype(jnp.float32)), rtol=1e-6)
    gs, gt = jgrad(fn, s, t)
    assert gs.dtype == dtype and np.all(np.isfinite(np.asarray(gs, np.float32)))
    ls = L.label_smoothed_cross_entropy(s, jnp.arange(4))
    assert ls.dtype == jnp.float32


def extreme_cases():
    r = np.random.default_rng(1)
    base = r.normal(size=(3, 6))
    return {
        "pm1e4": (np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4]]),
                  np.array([[-1e4, 1e4, 3.0], [1e4, -1e4, -1e4]])),
        "scale_1e3_vs_1e-3": (base * 1e3, base[::-1] * 1e-3),
        "scale_1e-3_vs_1e3": (base * 1e-3, base[::-1] * 1e3),
        "identical_large": (base * 1e4, base * 1e4),
        "one_hot_teacher": (base, np.where(np.arange(6) == 2, 1e4, -1e4) * np.ones((3, 1))),
    }


@pytest.mark.parametrize("case", sorted(extreme_cases()))
@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_extreme_inputs_are_finite(case, name):
    s, t = extreme_cases()[case]
    for dtype in (jnp.float32, jnp.float16, jnp.bfloat16):
        sj, tj = jnp.asarray(s, dtype), jnp.asarray(t, dtype)
        out = ALL_LOSSES[name](sj, tj)
        gs, gt = jgrad(ALL_LOSSES[name], sj, tj)
        assert np.all(np.isfinite(out)), out
        assert np.all(np.isfinite(np.asarray(gs, np.float32))), gs
        assert np.all(np.asarray(gt, np.float32) == 0)
    y = jnp.zeros(s.shape[:-1], jnp.int32)
    for dtype in (jnp.float32, jnp.bfloat16):
        sj = jnp.asarray(s, dtype)
        assert L.label_smoothed_cross_entropy(sj, y).dtype == jnp.float32
        assert np.all(np.isfinite(L.label_smoothed_cross_entropy(sj, y)))
        assert np.all(np.isfinite(np.asarray(jax.grad(lambda x: L.label_smoothed_cross_entropy(x, y).sum())(sj),
                                             np.float32)))


def test_limits_where_reference_is_nan():
    """Documented behaviour: the float32 reference gives NaN, we give the limit value."""
    s = np.array([[0.0, 0.0, -200.0]])  # q_2 underflows to 0 in float32
    t = np.array([[0.0, -200.0, 0.0]])  # p_1 underflows to 0 in float32
    ref32 = ref_f_divergence(s, t, 1.0, dtype=np.float32)
    assert np.isnan(ref32[0]).all() and np.isnan(ref32[2]).any()
    exact = ref_f_divergence(s, t, 1.0, dtype=np.float64)  # float64: nothing underflows
    ours = L.alpha_divergence(s, t, 1.0)
    np.testing.assert_allclose(ours, exact[0], rtol=1e-5)
    np.testing.assert_allclose(jgrad(div(1.0), s, t)[0], exact[2], atol=1e-6)
    # alpha ~ 0 branch: reference -log 0 = inf, we give the finite log-space value
    ref0 = ref_f_divergence(s, t, 0.0, dtype=np.float32)[0]
    assert np.isinf(ref0).all()
    np.testing.assert_allclose(
        L.alpha_divergence(s, t, 0.0), ref_f_divergence(s, t, 0.0)[0], rtol=1e-5
    )
    # the adaptive loss stays finite and picks the larger of the finite values
    ada = L.adaptive_alpha_divergence(s, t)
    left = L.alpha_divergence(s, t, -1.0)
    right = L.alpha_divergence(s, t, 1.0)
    np.testing.assert_array_equal(ada, jnp.maximum(left, right))


def test_extreme_values_are_limits():
    s = jnp.array([[1e4, -1e4]])
    t = jnp.array([[-1e4, 1e4]])
    np.testing.assert_allclose(L.alpha_divergence(s, t, 1.0), 2e4, rtol=1e-6)  # KL(p||q)
    # KL(q||p): the reference gives -log 0 = inf here
    np.testing.assert_allclose(L.alpha_divergence(s, t, 0.0), 2e4, rtol=1e-6)
    np.testing.assert_allclose(L.alpha_divergence(s, t, -1.0), 2.0, rtol=1e-6)  # (5 - 1) / 2
    np.testing.assert_allclose(L.adaptive_alpha_divergence(s, t), 2e4, rtol=1e-6)
    # clipping makes alpha > 1 divergences negative, in the reference too: (0 - 1) / 2
    np.testing.assert_allclose(L.alpha_divergence(s, t, 2.0), -0.5, rtol=1e-6)
    np.testing.assert_allclose(ref_f_divergence(s, t, 2.0)[0], -0.5, rtol=1e-12)


# --------------------------------------------------------------------------------------
# Argument errors
# --------------------------------------------------------------------------------------
def test_shape_mismatch_names_both_shapes():
    s, t = jnp.zeros((2, 5)), jnp.zeros((2, 6))
    for fn in (div(1.0), L.adaptive_alpha_divergence, L.soft_cross_entropy):
        with pytest.raises(ValueError, match=r"\(2, 5\).*\(2, 6\)"):
            fn(s, t)
    with pytest.raises(ValueError, match="class axis"):
        L.alpha_divergence(jnp.zeros(()), jnp.zeros(()), 1.0)


def test_label_errors():
    x = jnp.zeros((4, 10))
    with pytest.raises(ValueError, match=r"labels.shape=\(3,\)"):
        L.label_smoothed_cross_entropy(x, jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match="integer"):
        L.label_smoothed_cross_entropy(x, jnp.zeros(4))
    with pytest.raises(ValueError, match="smoothing"):
        L.label_smoothed_cross_entropy(x, jnp.zeros(4, jnp.int32), smoothing=1.5)


@pytest.mark.parametrize("bad", [jnp.array(1.0), True, "1.0", None, float("nan")])
def test_alpha_must_be_python_float(bad):
    s = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="alpha"):
        L.alpha_divergence(s, s, bad)
    with pytest.raises(ValueError, match="alpha_min"):
        L.adaptive_alpha_divergence(s, s, alpha_min=bad)


def test_alpha_traced_under_jit_raises():
    s = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="static"):
        jax.jit(L.alpha_divergence)(s, s, 0.5)


@pytest.mark.parametrize("clip", [0.0, -1.0, float("nan")])
def test_iw_clip_must_be_positive(clip):
    s = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="iw_clip"):
        L.alpha_divergence(s, s, 0.5, iw_clip=clip)
    with pytest.raises(ValueError, match="iw_clip"):
        L.adaptive_alpha_divergence(s, s, iw_clip=clip)


def test_int_alpha_accepted(rng):
    s, t = small_pair(rng)
    np.testing.assert_array_equal(L.alpha_divergence(s, t, 1), L.alpha_divergence(s, t, 1.0))
    np.testing.assert_array_equal(L.alpha_divergence(s, t, -1), L.alpha_divergence(s, t, -1.0))
