"""Layers against plain NumPy float64 forwards written from the spec text (alphanet-spec.md §2.3, §2.7).

The masked-vs-static tests compare two users of `alphanet_jax/layers.py`, so a bug in a layer would be
invisible to them; these tests compare the layers with independent float64 references instead.
"""

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

from alphanet_jax import layers

EPS32 = float(np.finfo(np.float32).eps)
BN_EPS = 1e-5


def _np_batch_norm(x, gamma, beta, mean_s, var_s, active):
    """Spec §2.7: train-mode BN over the first `active` channels: batch mean and *biased* variance over
    (N, H, W) normalise; the returned stats are the batch mean and the *unbiased* (n/(n-1)) variance for
    active channels and the stored ones for the rest; inactive channels output zero."""
    x = x.astype(np.float64)
    n = x.shape[0] * x.shape[1] * x.shape[2]
    c = x.shape[-1]
    y = np.zeros_like(x)
    mean_new, var_new = mean_s.astype(np.float64).copy(), var_s.astype(np.float64).copy()
    for ch in range(active):
        v = x[..., ch]
        m = v.sum() / n
        biased = ((v - m) ** 2).sum() / n
        y[..., ch] = (v - m) / np.sqrt(biased + BN_EPS) * gamma[ch] + beta[ch]
        mean_new[ch], var_new[ch] = m, biased * n / (n - 1)
    assert c >= active
    return y, mean_new, var_new


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 3), h=st.integers(1, 7), w=st.integers(1, 7), c=st.integers(1, 9),
       data=st.data(), seed=st.integers(0, 2**16))
def test_train_mode_batch_norm_with_partial_mask_matches_numpy(n, h, w, c, data, seed):
    """Tolerance: the float32 mean and variance are sums of m = N*H*W terms, |error| <= m*eps*sum-scale
    (recursive summation bound); inputs are mu + sigma*u with |mu| <= 2, sigma in [0.5, 2], u uniform of unit
    variance, so max|x|/sigma <= 2/0.5 + sqrt(3) < 6 and the normalised value (x - mean)/std carries an
    absolute error <= ~ 4*m*eps*6 (mean, var, rsqrt and the affine step). We allow 8*m*eps*6*(1 + |gamma|)
    absolute plus the same relative; a biased/unbiased swap changes outputs by >= 1/(2m) relative (m <= 147:
    3e-3), far above that (<= 4.2e-4)."""
    m = n * h * w
    if m < 2:  # PyTorch's train-mode BN rejects a single value per channel (no unbiased variance).
        m, n = 2, 2
    active = data.draw(st.integers(1, c))
    rng = np.random.default_rng(seed)
    mu = rng.uniform(-2, 2, c)
    sigma = rng.uniform(0.5, 2, c)
    x = (mu + sigma * rng.uniform(-np.sqrt(3), np.sqrt(3), (n, h, w, c))).astype(np.float32)
    gamma = rng.uniform(-2, 2, c).astype(np.float32)
    beta = rng.uniform(-2, 2, c).astype(np.float32)
    mean_s = rng.normal(size=c).astype(np.float32)
    var_s = rng.uniform(0.5, 2, c).astype(np.float32)

    y, new = layers.batch_norm(jnp.asarray(x), {"scale": jnp.asarray(gamma), "bias": jnp.asarray(beta)},
                               {"mean": jnp.asarray(mean_s), "var": jnp.asarray(var_s)},
                               layers.channel_mask(active, c), train=True, eps=BN_EPS)
    y_ref, mean_ref, var_ref = _np_batch_norm(x, gamma, beta, mean_s, var_s, active)
    y, mean_new, var_new = np.asarray(y), np.asarray(new["mean"]), np.asarray(new["var"])
    assert y.shape == x.shape and y.dtype == np.float32

    tol = 8 * m * EPS32 * 6
    np.testing.assert_allclose(y[..., :active], y_ref[..., :active], rtol=tol,
                               atol=tol * (1 + np.abs(gamma[:active]).max()))
    assert np.all(y[..., active:] == 0.0), "inactive channels must be exactly zero"
    # Stats: mean error <= m*eps*max|x| (max|x| <= 2 + 2*sqrt(3) < 6); variance relative error <= ~ 2*m*eps*6^2/sigma^2
    # bounded by the same factor with sigma >= 0.5 (we allow 8*m*eps*36*4 relative).
    np.testing.assert_allclose(mean_new[:active], mean_ref[:active], rtol=0, atol=4 * m * EPS32 * 6)
    np.testing.assert_allclose(var_new[:active], var_ref[:active], rtol=8 * m * EPS32 * 36 * 4, atol=0)
    assert np.array_equal(mean_new[active:], mean_s[active:]), "inactive channels keep their stored mean"
    assert np.array_equal(var_new[active:], var_s[active:]), "inactive channels keep their stored var"


def _np_avg_pool_2x2(x):
    """Spec §2.3: 2x2 window, stride 2; padding 1 on all four sides when the width (last spatial dim) is odd,
    else 0 (the height is not checked); padded zeros count in the average (count_include_pad=True), so every
    window divides by 4. Written as explicit windows over the unpadded input."""
    n, h, w, c = x.shape
    p = 1 if w % 2 else 0
    ho, wo = (h + 2 * p - 2) // 2 + 1, (w + 2 * p - 2) // 2 + 1
    y = np.zeros((n, ho, wo, c))
    for i in range(ho):
        for j in range(wo):
            for r in (2 * i - p, 2 * i + 1 - p):
                for s in (2 * j - p, 2 * j + 1 - p):
                    if 0 <= r < h and 0 <= s < w:
                        y[:, i, j] += x[:, r, s].astype(np.float64)
    return y / 4.0


def test_numpy_avg_pool_follows_the_spec_text():
    """The reference itself against the spec's stated consequences: odd width -> side (n+1)/2 and, on a constant
    input, corner 1/4 and border 1/2 of the real pixels' mean; even width -> no padding, an odd height drops its
    last row."""
    y = _np_avg_pool_2x2(np.ones((1, 5, 5, 1)))
    assert y.shape == (1, 3, 3, 1)
    np.testing.assert_array_equal(y[0, :, :, 0], [[0.25, 0.5, 0.5], [0.5, 1, 1], [0.5, 1, 1]])
    y = _np_avg_pool_2x2(np.ones((1, 5, 4, 1)))
    assert y.shape == (1, 2, 2, 1) and np.all(y == 1.0)
    y = _np_avg_pool_2x2(np.ones((1, 4, 5, 1)))  # odd width pads the (even) height too: 4 + 2 -> 3 rows
    assert y.shape == (1, 3, 3, 1)
    np.testing.assert_array_equal(y[0, :, :, 0], [[0.25, 0.5, 0.5], [0.5, 1, 1], [0.25, 0.5, 0.5]])


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 2), h=st.integers(1, 9), w=st.integers(1, 9), c=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_avg_pool_2x2_matches_numpy_on_odd_and_even_sizes(n, h, w, c, seed):
    """Tolerance: a sum of 4 float32 values then a division by 4 (exact): |error| <= 3*eps*sum|x|/4 <= 3*eps*max|x|,
    so atol 4*eps*max|x| plus rtol 4*eps."""
    if h + 2 * (w % 2) < 2:  # a 1-row even-width input has no full window: PyTorch rejects it too
        h = 2
    x = np.random.default_rng(seed).normal(size=(n, h, w, c)).astype(np.float32)
    y = np.asarray(layers.avg_pool_2x2(jnp.asarray(x)))
    y_ref = _np_avg_pool_2x2(x)
    assert y.shape == y_ref.shape
    np.testing.assert_allclose(y, y_ref, rtol=4 * EPS32, atol=4 * EPS32 * np.abs(x).max())
