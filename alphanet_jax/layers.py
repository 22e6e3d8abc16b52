"""Pure-function building blocks shared by the masked supernet and the static export.

Everything takes NHWC activations and plain parameter dicts; masks are boolean
vectors over the channel axis. Statistics and normalisation run in float32
whatever the compute dtype.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def activation(name: str):
    """swish (SiLU, the reference's 'swish'), relu or relu6."""
    if name == "swish":
        return jax.nn.silu
    if name == "relu":
        return jax.nn.relu
    if name == "relu6":
        return jax.nn.relu6
    raise ValueError(f"unknown activation {name!r}")


def hard_sigmoid(x: Array) -> Array:
    """relu6(x + 3) / 6, the SE gate."""
    return jax.nn.relu6(x + 3.0) / 6.0


def channel_mask(active: Any, size: int) -> Array:
    """True for the first `active` of `size` channels (prefix slicing, spec §3.1)."""
    return jnp.arange(size) < active


def kernel_mask(active_k: Any, max_k: int) -> Array:
    """[max_k, max_k] mask of the centred active_k x active_k window (spec §3.2)."""
    r = jnp.abs(jnp.arange(max_k) - max_k // 2) <= active_k // 2
    return r[:, None] & r[None, :]


def conv2d(x: Array, kernel: Array, stride: int = 1, groups: int = 1) -> Array:
    """NHWC x HWIO convolution with the reference's symmetric k//2 padding (never 'SAME')."""
    k = kernel.shape[0]
    pad = k // 2
    return jax.lax.conv_general_dilated(
        x, kernel.astype(x.dtype), window_strides=(stride, stride), padding=((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


DEPTHWISE_IMPLS = ("xla", "shift")


def depthwise(x: Array, kernel: Array, stride: int, impl: str = "xla") -> Array:
    """Depthwise conv; kernel [k, k, 1, C]; same symmetric padding as `conv2d`.

    impl 'xla' (default): XLA's grouped convolution. 'shift': the sum of k*k shifted, strided
    slices of the input times one kernel tap each (float32 accumulation), differentiated like
    any elementwise code: an alternative where a backend's grouped convolution is slow. XLA's CPU
    backend, for one, expands the grouped weight gradient densely (~C times the FLOPs); there
    'shift' ran one 8x56x56x192 5x5 layer 6.5x faster forward + backward, yet a whole AlphaNet
    step (batch 2, shift on its big layers) only 1.2x faster while compiling 3x longer, so it is
    not the default (benchmarks/RESULTS.md).
    """
    if impl == "xla":
        return conv2d(x, kernel, stride, groups=x.shape[-1])
    if impl == "shift":
        return _depthwise_shift(x, kernel, stride)
    raise ValueError(f"depthwise impl must be one of {DEPTHWISE_IMPLS}, got {impl!r}")


def _depthwise_shift(x: Array, kernel: Array, stride: int) -> Array:
    k = kernel.shape[0]
    pad = k // 2
    n, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    kf = kernel.astype(x.dtype).astype(jnp.float32)  # the taps in the compute dtype, as `conv2d`
    out = None
    for i in range(k):
        for j in range(k):
            xs = jax.lax.slice(xp, (0, i, j, 0), (n, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, c),
                               (1, stride, stride, 1))
            t = xs.astype(jnp.float32) * kf[i, j, 0]
            out = t if out is None else out + t
    return out.astype(x.dtype)


def pointwise(x: Array, kernel: Array) -> Array:
    """1x1 conv as a matmul; kernel [C_in, C_out]."""
    return jnp.einsum("nhwc,cd->nhwd", x, kernel.astype(x.dtype))


def batch_stats(x: Array, axis_name: str | None = None) -> tuple[Array, Array, Array]:
    """Per-channel (mean, biased var, count) over N, H, W (and `axis_name` devices) in float32."""
    xf = x.astype(jnp.float32)
    n = np.prod(x.shape[:-1])
    mean = jnp.mean(xf, axis=(0, 1, 2))
    if axis_name is not None:
        mean = jax.lax.pmean(mean, axis_name)
    var = jnp.mean(jnp.square(xf - mean), axis=(0, 1, 2))
    if axis_name is not None:
        var = jax.lax.pmean(var, axis_name)
        n = n * jax.lax.psum(1, axis_name)
    return mean, var, n


def batch_norm(x: Array, p: dict, s: dict, mask: Array, *, train: bool, eps: float,
               axis_name: str | None = None) -> tuple[Array, dict | None]:
    """BN restricted to the active channels; inactive channels come out exactly zero.

    Train mode normalises with the batch mean and biased variance and returns this
    batch's statistics as {'mean', 'var' (unbiased)}: what a PyTorch BN with
    momentum 1 would store, so averaging them over batches is the reference's
    cumulative-average calibration (spec §7). Eval mode uses the stored `s`.
    """
    if train:
        mean, var, n = batch_stats(x, axis_name)
        unbiased = var * (n / jnp.maximum(n - 1, 1))
        # Inactive channels keep their stored statistics.
        new = {"mean": jnp.where(mask, mean, s["mean"]), "var": jnp.where(mask, unbiased, s["var"])}
    else:
        mean, var = s["mean"], s["var"]
        new = None
    scale = p["scale"] * jax.lax.rsqrt(var + eps)
    shift = p["bias"] - mean * scale
    y = x.astype(jnp.float32) * scale + shift
    y = jnp.where(mask, y, 0.0)
    return y.astype(x.dtype), new


def avg_pool_2x2(x: Array) -> Array:
    """The shortcut's 2x2/2 average pool: padding 0 for an even width, 1 (zeros counted) for odd."""
    pad = 0 if x.shape[2] % 2 == 0 else 1
    y = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1),
                              ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    return y / jnp.asarray(4, x.dtype)


def fit_channels(x: Array, c: int) -> Array:
    """Zero-pads or truncates the channel axis to c (inactive channels are zero either way)."""
    have = x.shape[-1]
    if have == c:
        return x
    if have > c:
        return x[..., :c]
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, c - have)])


@functools.lru_cache(maxsize=64)
def _cubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] matrix of PyTorch's bicubic (A=-0.75, half-pixel, clamped borders, no antialias)."""
    a = -0.75

    def w_near(t):  # |x| <= 1
        return ((a + 2) * t - (a + 3)) * t * t + 1

    def w_far(t):  # 1 < |x| < 2
        return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a

    m = np.zeros((n_out, n_in), np.float64)
    scale = n_in / n_out
    for i in range(n_out):
        src = scale * (i + 0.5) - 0.5
        x0 = int(np.floor(src))
        t = src - x0
        ws = (w_far(t + 1), w_near(t), w_near(1 - t), w_far(2 - t))
        for j, w in zip(range(x0 - 1, x0 + 3), ws):
            m[i, min(max(j, 0), n_in - 1)] += w
    return m.astype(np.float32)


def resize_bicubic(x: Array, size: int) -> Array:
    """`torch.nn.functional.interpolate(x, size, mode='bicubic', align_corners=False)` on NHWC.

    Separable, as two small matmuls (fast on accelerators). No-op when the width is already `size`
    (the reference compares only the width, spec §3.8).
    """
    n, h, w, c = x.shape
    if w == size:
        return x
    mh = jnp.asarray(_cubic_matrix(h, size))
    mw = jnp.asarray(_cubic_matrix(w, size))
    xf = x.astype(jnp.float32)
    y = jnp.einsum("oh,nhwc->nowc", mh, xf, precision=jax.lax.Precision.HIGHEST)
    y = jnp.einsum("pw,nowc->nopc", mw, y, precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)
