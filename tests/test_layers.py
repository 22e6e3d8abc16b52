"""Building blocks: both depthwise-convolution implementations compute the same convolution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from alphanet_jax import layers


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 3), h=st.integers(3, 12), w=st.integers(3, 12), c=st.integers(1, 9),
       k=st.sampled_from([1, 3, 5, 7]), stride=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_shifted_depthwise_equals_xla_grouped_convolution_values_and_gradients(n, h, w, c, k, stride, seed):
    kx, kk, kg = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(kx, (n, h, w, c))
    kernel = jax.random.normal(kk, (k, k, 1, c))
    y, vjp = jax.vjp(lambda a, b: layers.depthwise(a, b, stride, "shift"), x, kernel)
    y_ref, vjp_ref = jax.vjp(lambda a, b: layers.depthwise(a, b, stride, "xla"), x, kernel)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    g = jax.random.normal(kg, y.shape)
    for got, want in zip(vjp(g), vjp_ref(g)):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * max(1.0, float(jnp.abs(want).max())))


def test_shifted_depthwise_in_bfloat16_accumulates_in_float32():
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 8))
    kernel = jax.random.normal(jax.random.PRNGKey(1), (5, 5, 1, 8))
    y = layers.depthwise(x.astype(jnp.bfloat16), kernel, 2, "shift")
    assert y.dtype == jnp.bfloat16
    exact = layers.depthwise(x.astype(jnp.bfloat16).astype(jnp.float32), kernel.astype(jnp.bfloat16)
                             .astype(jnp.float32), 2, "xla")
    # one bfloat16 rounding of the result, not one per tap
    np.testing.assert_allclose(np.asarray(y, np.float32), exact, rtol=2.0 ** -8, atol=1e-6)


def test_shift_gradient_does_only_the_necessary_work_where_xla_cpu_expands_it():
    """XLA's CPU backend expands the grouped weight-gradient convolution densely (~C x the FLOPs);
    'shift' stays within 3x of the k*k*N*H*W*C multiply-adds that forward + backward need."""
    assert jax.default_backend() == "cpu"
    n, h, c, k = 2, 28, 96, 5
    x = jnp.ones((n, h, h, c))
    kernel = jnp.ones((k, k, 1, c))
    needed = 3 * 2 * n * h * h * c * k * k  # forward + two gradients, a multiply-add = 2 FLOPs

    def flops(impl):
        f = jax.grad(lambda a, b: jnp.sum(layers.depthwise(a, b, 1, impl)), argnums=(0, 1))
        cost = jax.jit(f).lower(x, kernel).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    assert flops("shift") < 3 * needed
    assert flops("xla") > 20 * needed  # the expansion; if XLA's CPU backend fixes it, update the docstring


def test_unknown_depthwise_impl_is_refused():
    with pytest.raises(ValueError, match="depthwise impl"):
        layers.depthwise(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 1, 2)), 1, "cudnn")
