"""Building blocks: every depthwise-convolution implementation computes the same convolution, and the
CPU pointwise backward equals JAX's own."""

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from alphanet_jax import depthwise as depthwise_lib
from alphanet_jax import layers


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 3), h=st.integers(1, 12), w=st.integers(1, 12), c=st.integers(1, 9),
       k=st.sampled_from([1, 3, 5, 7]), stride=st.sampled_from([1, 2]), seed=st.integers(0, 2**16),
       impl=st.sampled_from(["shift", "taps"]))
def test_shifted_depthwise_equals_xla_grouped_convolution_values_and_gradients(n, h, w, c, k, stride, seed, impl):
    """Values and both gradients (odd sizes, strides 1 and 2, kernels smaller or larger than the input).

    Tolerance: k*k float32 products summed in another order, |error| <= k*k * eps * sum|terms|; with
    unit normals that sum stays below ~5k*k, so 1e-5 absolute plus relative (gradients: on their scale)."""
    kx, kk, kg = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(kx, (n, h, w, c))
    kernel = jax.random.normal(kk, (k, k, 1, c))

    @jax.jit  # one compile per example instead of one per primitive (op by op)
    def value_and_grads(x, kernel, kg):
        (y, vjp), (y_ref, vjp_ref) = (jax.vjp(lambda a, b, i=i: depthwise_lib.depthwise(a, b, stride, i), x, kernel)
                                      for i in (impl, "xla"))
        g = jax.random.normal(kg, y.shape)
        return y, y_ref, vjp(g), vjp_ref(g)

    y, y_ref, grads, grads_ref = value_and_grads(x, kernel, kg)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, grads_ref):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * max(1.0, float(jnp.abs(want).max())))


def test_shifted_depthwise_in_bfloat16_accumulates_in_float32():
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 8))
    kernel = jax.random.normal(jax.random.PRNGKey(1), (5, 5, 1, 8))
    y = depthwise_lib.depthwise(x.astype(jnp.bfloat16), kernel, 2, "shift")
    assert y.dtype == jnp.bfloat16
    exact = depthwise_lib.depthwise(x.astype(jnp.bfloat16).astype(jnp.float32), kernel.astype(jnp.bfloat16)
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
        f = jax.grad(lambda a, b: jnp.sum(depthwise_lib.depthwise(a, b, 1, impl)), argnums=(0, 1))
        cost = jax.jit(f).lower(x, kernel).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    assert flops("shift") < 3 * needed
    assert flops("xla") > 20 * needed  # the expansion; if XLA's CPU backend fixes it, update the docstring


def test_taps_kernel_gradient_is_the_same_in_any_chunking():
    """The kernel gradient's chunks (bands of rows, one example each) add up to the whole reduction."""
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 11, 9, 4))
    for stride in (1, 2):
        dy = jax.random.normal(jax.random.PRNGKey(stride), (3, (11 - 1) // stride + 1, (9 - 1) // stride + 1, 4))
        whole = depthwise_lib._depthwise_kernel_grad(x, dy, 5, stride, chunk_elems=1 << 30)
        for chunk in (1, 9 * 4, 3 * 9 * 4):
            np.testing.assert_allclose(depthwise_lib._depthwise_kernel_grad(x, dy, 5, stride, chunk_elems=chunk), whole,
                                       rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("impl", ["taps", "xla"])
def test_depthwise_and_pointwise_gradients_under_shard_map_sum_over_devices(impl):
    """A replicated kernel inside shard_map: the hand-written backwards give the per-device kernel
    gradients, which autodiff sums over the 8 devices, as XLA's own convolution does."""
    from jax.sharding import PartitionSpec as P

    from alphanet_jax import mesh as mesh_lib
    mesh = mesh_lib.make_mesh(8)
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 6, 6, 4))
    dw = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 1, 4))
    pw = jax.random.normal(jax.random.PRNGKey(2), (4, 5))

    def local(x, dw, pw):
        h = layers.pointwise(depthwise_lib.depthwise(x, dw, 2, impl), pw)
        return jax.lax.psum(jnp.sum(jnp.sin(h)), "data")

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P(), P()), out_specs=P())
    plain = lambda x, dw, pw: jnp.sum(  # noqa: E731
        jnp.sin(layers._pointwise(depthwise_lib.depthwise(x, dw, 2, "xla"), pw)))
    got = jax.grad(sharded, argnums=(0, 1, 2))(x, dw, pw)
    want = jax.grad(plain, argnums=(0, 1, 2))(x, dw, pw)
    for g, w_ in zip(got, want):
        np.testing.assert_allclose(g, w_, rtol=1e-5, atol=1e-5 * float(jnp.abs(w_).max()))


@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 3), h=st.integers(1, 9), cin=st.integers(1, 12), cout=st.integers(1, 12),
       seed=st.integers(0, 2**16))
def test_pointwise_cpu_backward_equals_autodiff(n, h, cin, cout, seed):
    kx, kk, kg = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(kx, (n, h, h + 1, cin))
    kernel = jax.random.normal(kk, (cin, cout))

    @jax.jit  # one compile per example instead of one per primitive
    def value_and_grads(x, kernel, kg):
        (y, vjp), (y_ref, vjp_ref) = (jax.vjp(f, x, kernel) for f in (layers._pointwise_cpu, layers._pointwise))
        g = jax.random.normal(kg, y.shape)
        return y, y_ref, vjp(g), vjp_ref(g)

    y, y_ref, grads, grads_ref = value_and_grads(x, kernel, kg)
    np.testing.assert_array_equal(y, y_ref)
    for got, want in zip(grads, grads_ref):
        # sums of n*h*(h+1) (or cout) products in another order
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(1.0, float(jnp.abs(want).max())))


def test_unknown_depthwise_impl_is_refused():
    with pytest.raises(ValueError, match="depthwise impl"):
        depthwise_lib.depthwise(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 1, 2)), 1, "cudnn")


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("h", [9, 10])
def test_elastic_taps_equal_the_masked_kernel(stride, h):
    """Running only the active window's taps (kernel_sizes given) computes the same values and
    gradients as all 7x7 taps with the kernel masked to that window."""
    x = jax.random.normal(jax.random.PRNGKey(h), (2, h, 11, 6))
    kernel = jax.random.normal(jax.random.PRNGKey(stride), (7, 7, 1, 6))

    def loss(x, w, active, elastic):
        y = depthwise_lib.depthwise(x, w * layers.kernel_mask(active, 7)[:, :, None, None], stride, "taps",
                                    active_kernel=active if elastic else None,
                                    kernel_sizes=(3, 5, 7) if elastic else ())
        return jnp.sum(y * jnp.cos(y)), y

    # The active size traced: one program each for every size, as in the supernet.
    elastic, masked = (jax.jit(jax.value_and_grad(lambda x, w, a, e=e: loss(x, w, a, e), (0, 1), has_aux=True))
                       for e in (True, False))
    for active in (3, 5, 7):
        mask = layers.kernel_mask(active, 7)[:, :, None, None]
        (_, y_e), g_e = elastic(x, kernel, jnp.asarray(active))
        (_, y_m), g_m = masked(x, kernel, jnp.asarray(active))
        # Sums of <= 49 float32 products of O(1) values, in the same order; FMA contraction may differ:
        # a few float32 epsilons times the sum of |terms| (<= ~49 * 4).
        tol = dict(rtol=1e-5, atol=200 * 49 * float(np.finfo(np.float32).eps))
        np.testing.assert_allclose(y_e, y_m, **tol)
        np.testing.assert_allclose(g_e[0], g_m[0], **tol)
        np.testing.assert_allclose(g_e[1], g_m[1], **tol)
        assert np.all(np.asarray(g_e[1])[~np.asarray(mask)[:, :, 0, 0]] == 0)  # nothing outside the window


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_save_is_a_checkpoint_name_without_a_reduce_precision_copy(dtype):
    """`layers.save` tags what a `save_only_these_names` checkpoint keeps, as `checkpoint_name` does
    (the matmul is not recomputed in the backward pass: one dot forward, one for the weight gradient),
    the same values and gradients bit for bit, but without the `reduce_precision` JAX puts after a
    saved float (which `checkpoint_name` still gets: the control)."""
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 5)).astype(dtype)
    w = jax.random.normal(jax.random.PRNGKey(1), (5, 4)).astype(dtype)
    policy = jax.checkpoint_policies.save_only_these_names(layers.SAVED_CONV)

    def loss(tag):
        return jax.checkpoint(lambda w: jnp.sum(jnp.sin(tag(x @ w, layers.SAVED_CONV)).astype(jnp.float32)),
                              policy=policy)

    saved, named = jax.grad(loss(layers.save)), jax.grad(loss(checkpoint_name))
    np.testing.assert_array_equal(np.asarray(saved(w), np.float32), np.asarray(named(w), np.float32))
    assert "reduce_precision" not in jax.jit(saved).lower(w).as_text()
    assert "reduce_precision" in jax.jit(named).lower(w).as_text()
    assert str(jax.make_jaxpr(saved)(w)).count("dot_general") == 2
    assert layers.save(x, layers.SAVED_CONV).dtype == dtype
    np.testing.assert_array_equal(np.asarray(layers.save(x, "any"), np.float32), np.asarray(x, np.float32))
