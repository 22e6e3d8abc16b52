"""The depthwise convolution and its implementations ('xla', 'shift', 'taps'; see `depthwise`).

'taps' is a sum of shifted, strided input slices times one kernel tap each (float32 accumulation) with
a hand-written backward; with elastic kernels only the active centred window's taps run.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from alphanet_jax.layers import conv2d, like_varying

Array = jax.Array


DEPTHWISE_IMPLS = ("auto", "xla", "shift", "taps")


def resolve_depthwise_impl(impl: str) -> str:
    """'auto' -> 'taps' on CPU (measured fastest there, benchmarks/RESULTS.md), 'xla' elsewhere."""
    if impl not in DEPTHWISE_IMPLS:
        raise ValueError(f"depthwise impl must be one of {DEPTHWISE_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "taps" if jax.default_backend() == "cpu" else "xla"
    return impl


def depthwise(x: Array, kernel: Array, stride: int, impl: str = "auto", active_kernel: Any = None,
              kernel_sizes: tuple[int, ...] = ()) -> Array:
    """Depthwise conv; kernel [k, k, 1, C]; same symmetric padding as `conv2d`.

    impl 'xla': XLA's grouped convolution (fast on GPU). 'shift': the sum of k*k shifted, strided
    slices of the input times one kernel tap each (float32 accumulation), differentiated by JAX.
    'taps': the same forward with a hand-written backward: the input gradient is again a tap sum
    (of the output gradient with the flipped kernel; for stride 2 one tap sum per output phase),
    the kernel gradient k*k reductions over blocks of examples that stay in cache. XLA's CPU
    backend runs grouped convolutions slowly and expands their weight gradient densely (~C x the
    FLOPs): one 8x56x56x192 5x5 layer took 1204 ms forward + backward with 'xla', 178 ms with
    'shift' and ~90 ms with 'taps' (benchmarks/RESULTS.md). 'auto': 'taps' on CPU, 'xla' elsewhere.

    Elastic kernels: with 'taps', `active_kernel` (traced) and the candidate sizes `kernel_sizes`
    (static, odd), only the active centred window's taps run (`lax.switch`, one branch per size)
    instead of all k*k with zeros outside the window: the same sum in the same order, since the
    masked taps only add zeros (for finite inputs). Other impls take the masked kernel as it is.
    """
    impl = resolve_depthwise_impl(impl)
    if impl == "xla":
        return conv2d(x, kernel, stride, groups=x.shape[-1])
    if impl == "shift":
        return _depthwise_shift(x, kernel, stride)
    kernel = like_varying(kernel, x)
    sizes = tuple(sorted(set(int(k) for k in kernel_sizes)))
    if active_kernel is None or len(sizes) < 2:
        return _depthwise_taps(x, kernel, stride)
    if any(k % 2 == 0 or k > kernel.shape[0] for k in sizes):
        raise ValueError(f"kernel sizes {sizes} must be odd and at most the kernel's {kernel.shape[0]}")
    branch = jnp.sum(jnp.asarray(sizes[:-1]) < jnp.asarray(active_kernel)).astype(jnp.int32)
    return _depthwise_taps_elastic(x, kernel, branch, stride, sizes)


def _tap_window(xp: Array, i: int, j: int, ho: int, wo: int, stride: int) -> Array:
    """xp[:, s*u + i, s*v + j, :] for u < ho, v < wo: the inputs that tap (i, j) multiplies."""
    n, c = xp.shape[0], xp.shape[-1]
    return jax.lax.slice(xp, (0, i, j, 0), (n, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, c),
                         (1, stride, stride, 1))


def _tap_sum(xp: Array, taps: Array, ho: int, wo: int, stride: int) -> Array:
    """sum_{i,j} xp[:, s*u + i, s*v + j, :] * taps[i, j] over u < ho, v < wo, in float32.

    xp: [N, H, W, C] already padded; taps: [kh, kw, C] float32.
    """
    out = None
    for i in range(taps.shape[0]):
        for j in range(taps.shape[1]):
            t = _tap_window(xp, i, j, ho, wo, stride).astype(jnp.float32) * taps[i, j]
            out = t if out is None else out + t
    return out


def _out_size(h: int, k: int, stride: int) -> int:
    return (h + 2 * (k // 2) - k) // stride + 1


def _taps_f32(kernel: Array, dtype: Any) -> Array:
    """The kernel's taps rounded to the compute dtype, as `conv2d` uses them, in float32."""
    return kernel.astype(dtype).astype(jnp.float32)


def _depthwise_shift(x: Array, kernel: Array, stride: int) -> Array:
    k = kernel.shape[0]
    pad = k // 2
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kf = _taps_f32(kernel, x.dtype)
    ho, wo = _out_size(x.shape[1], k, stride), _out_size(x.shape[2], k, stride)
    return _tap_sum(xp, kf[:, :, 0], ho, wo, stride).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depthwise_taps(x: Array, kernel: Array, stride: int) -> Array:
    return _depthwise_shift(x, kernel, stride)


def _depthwise_taps_fwd(x, kernel, stride):
    return _depthwise_shift(x, kernel, stride), (x, kernel)


def _depthwise_input_grad(dy: Array, taps: Array, stride: int, h: int, w: int) -> Array:
    """d(loss)/dx of the tap sum: its transpose, again a stride-1 tap sum, one per output phase.

    With xp = x padded by p = k//2: dxp[s*q + a, s*r + b] = sum_{m,l} dy[q - m, r - l] taps[a + s*m, b + s*l],
    a correlation of dy with the flipped sub-kernel taps[a::s, b::s]; the s*s phases interleave.
    """
    k = taps.shape[0]
    pad = k // 2
    n, ho, wo, c = dy.shape
    qh, qw = -(-(h + 2 * pad) // stride), -(-(w + 2 * pad) // stride)  # phase output sizes
    dxp = None
    for a in range(min(stride, k)):
        for b in range(min(stride, k)):
            sub = taps[a::stride, b::stride][::-1, ::-1]
            mh, mw = sub.shape[0], sub.shape[1]
            dyp = jnp.pad(dy, ((0, 0), (mh - 1, max(0, qh - ho)), (mw - 1, max(0, qw - wo)), (0, 0)))
            phase = _tap_sum(dyp, sub, qh, qw, 1)
            if stride > 1:  # phase (a, b) fills rows s*q + a, columns s*r + b
                zero = jnp.zeros((), phase.dtype)
                phase = jax.lax.pad(phase, zero, ((0, 0, 0), (a, stride - 1 - a, stride - 1),
                                                  (b, stride - 1 - b, stride - 1), (0, 0, 0)))
            dxp = phase if dxp is None else dxp + phase
    return dxp[:, pad:pad + h, pad:pad + w, :].astype(dy.dtype)


def _depthwise_kernel_grad(x: Array, dy: Array, k: int, stride: int, chunk_elems: int = 1 << 20) -> Array:
    """[k*k, C] float32: sum over examples and positions of each tap's input slice times dy.

    The k*k reductions run chunk by chunk (one example, or a band of its output rows: at most
    `chunk_elems` values of dy) in a scan, as one variadic reduction per chunk, so each chunk's
    input rows stay in cache for all k*k taps instead of k*k passes over the whole batch.
    """
    pad = k // 2
    n, ho, wo, c = dy.shape
    rows = max(1, min(ho, chunk_elems // max(1, wo * c)))  # output rows per chunk
    chunks = -(-ho // rows)
    in_rows = (rows - 1) * stride + k  # padded input rows a chunk reads
    # Zero rows past the end contribute nothing; pad so that every chunk is full.
    xp = jnp.pad(x, ((0, 0), (pad, pad + max(0, chunks * rows * stride + k - stride - (x.shape[1] + 2 * pad))),
                     (pad, pad), (0, 0)))
    dyp = jnp.pad(dy, ((0, 0), (0, chunks * rows - ho), (0, 0), (0, 0)))

    def chunk_taps(_, idx):
        e, t = idx // chunks, idx % chunks
        xs = jax.lax.dynamic_slice(xp, (e, t * rows * stride, 0, 0), (1, in_rows, xp.shape[2], c))
        d = jax.lax.dynamic_slice(dyp, (e, t * rows, 0, 0), (1, rows, wo, c)).astype(jnp.float32)
        prods = [_tap_window(xs, i, j, rows, wo, stride).astype(jnp.float32) * d for i in range(k) for j in range(k)]
        # One variadic reduction: a single pass over the chunk accumulates all k*k taps (k*k
        # separate reductions re-read the chunk k*k times: 1.6-2.6x slower, benchmarks/RESULTS.md).
        zeros = [jnp.zeros((), jnp.float32)] * len(prods)
        sums = jax.lax.reduce(prods, zeros, lambda acc, v: [a + b for a, b in zip(acc, v)], (0, 1, 2))
        return None, jnp.stack(sums)

    # Per-chunk partial sums as scan outputs, not a carry: a carry would need its varying-ness
    # declared under shard_map.
    _, parts = jax.lax.scan(chunk_taps, None, jnp.arange(n * chunks))
    return jnp.sum(parts, axis=0)


def _taps_grads(x: Array, taps: Array, dy: Array, stride: int) -> tuple[Array, Array]:
    """(dx, d taps [k, k, C] float32) of the tap sum of x with float32 `taps` [k, k, C]."""
    k = taps.shape[0]
    dx = _depthwise_input_grad(dy, taps, stride, x.shape[1], x.shape[2])
    return dx.astype(x.dtype), _depthwise_kernel_grad(x, dy, k, stride).reshape(k, k, -1)


def _depthwise_taps_bwd(stride, res, dy):
    x, kernel = res
    dx, dk = _taps_grads(x, _taps_f32(kernel, x.dtype)[:, :, 0], dy, stride)
    return dx, dk[:, :, None, :].astype(kernel.dtype)


_depthwise_taps.defvjp(_depthwise_taps_fwd, _depthwise_taps_bwd)


def _centre(kernel: Array, k: int) -> Array:
    """The centred k x k window of a [K, K, ...] kernel (K, k odd)."""
    o = (kernel.shape[0] - k) // 2
    return kernel[o:o + k, o:o + k]


def _elastic_shift(x: Array, kernel: Array, branch: Array, stride: int, sizes: tuple[int, ...]) -> Array:
    return jax.lax.switch(branch, [functools.partial(lambda k, x, w: _depthwise_shift(x, _centre(w, k), stride), k)
                                   for k in sizes], x, kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _depthwise_taps_elastic(x: Array, kernel: Array, branch: Array, stride: int, sizes: tuple[int, ...]) -> Array:
    """`_depthwise_taps` with only the taps of the centred sizes[branch] window (zero outside it)."""
    return _elastic_shift(x, kernel, branch, stride, sizes)


def _depthwise_taps_elastic_fwd(x, kernel, branch, stride, sizes):
    return _elastic_shift(x, kernel, branch, stride, sizes), (x, kernel, branch)


def _depthwise_taps_elastic_bwd(stride, sizes, res, dy):
    x, kernel, branch = res
    big = kernel.shape[0]
    kf = _taps_f32(kernel, x.dtype)[:, :, 0]

    def grads(k, dy):
        dx, dk = _taps_grads(x, _centre(kf, k), dy, stride)
        o = (big - k) // 2
        return dx, jnp.pad(dk, ((o, o), (o, o), (0, 0)))  # zero outside the window

    dx, dk = jax.lax.switch(branch, [functools.partial(grads, k) for k in sizes], dy)
    return dx, dk[:, :, None, :].astype(kernel.dtype), None


_depthwise_taps_elastic.defvjp(_depthwise_taps_elastic_fwd, _depthwise_taps_elastic_bwd)
