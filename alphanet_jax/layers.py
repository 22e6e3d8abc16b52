"""Pure-function building blocks shared by the masked supernet and the static export.

Everything takes NHWC activations and plain parameter dicts; masks are boolean
vectors over the channel axis. Statistics and normalisation run in float32
whatever the compute dtype.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# `jax.checkpoint` names of what a block keeps for its backward under block_residuals='convs'
# (supernet.resolve_block_residuals): convolution outputs, the SE gate, BN batch statistics.
SAVED_CONV, SAVED_SE, SAVED_BN_STATS = "conv", "se", "bn_stats"
SAVED_NAMES = (SAVED_CONV, SAVED_SE, SAVED_BN_STATS)


def save(x: Array, name: str) -> Array:
    """`checkpoint_name(x, name)`: x is what a `save_only_these_names(name)` checkpoint keeps.

    Differentiated, the tag sits on x's bits (an unsigned integer view) instead of on x, the same
    values: `jax.checkpoint` then keeps the residual without the `reduce_precision` it puts after
    every saved float (a guard against excess precision, which a stored tensor cannot have), which
    XLA:CPU runs as one more copy of every saved convolution output (benchmarks/RESULTS.md, session 10).
    """
    return _save(x, name)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _save(x: Array, name: str) -> Array:
    return checkpoint_name(x, name)


@_save.defjvp
def _save_jvp(name, primals, tangents):
    (x,), (t,) = primals, tangents
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return checkpoint_name(x, name), t
    bits = jnp.dtype(f"uint{8 * x.dtype.itemsize}")
    y = jax.lax.bitcast_convert_type(checkpoint_name(jax.lax.bitcast_convert_type(x, bits), name), x.dtype)
    return y, t


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


def like_varying(w: Array, x: Array) -> Array:
    """w cast to vary over the shard_map axes x varies over.

    Under shard_map a replicated weight meets per-device activations; a custom backward returns
    a per-device weight gradient, which must have the weight's type. Autodiff then sums it over
    devices, as for any replicated parameter.
    """
    missing = tuple(sorted(_varying_axes(x) - _varying_axes(w)))
    return jax.lax.pcast(w, missing, to="varying") if missing else w


def _varying_axes(x: Array) -> frozenset:
    """The shard_map axes x varies over (`manual_axis_type.varying` in jax 0.10, `vma` before)."""
    t = jax.typeof(x)
    mat = getattr(t, "manual_axis_type", None)
    return frozenset(mat.varying if mat is not None else (getattr(t, "vma", ()) or ()))


def pointwise(x: Array, kernel: Array) -> Array:
    """1x1 conv as a matmul; kernel [C_in, C_out].

    On CPU the backward is hand-written (`_pointwise_cpu`): JAX's own makes XLA fuse the
    surrounding BN backward into a transpose of the output gradient, which ran 2-3x slower
    for an expand conv (8x112x112, 24 -> 144: 178 -> 81 ms forward + backward with a BN around it).
    """
    if jax.default_backend() == "cpu":
        return _pointwise_cpu(x, like_varying(kernel, x))
    return _pointwise(x, kernel)


def _pointwise(x: Array, kernel: Array) -> Array:
    return jnp.einsum("nhwc,cd->nhwd", x, kernel.astype(x.dtype))


@jax.custom_vjp
def _pointwise_cpu(x: Array, kernel: Array) -> Array:
    return _pointwise(x, kernel)


def _pointwise_cpu_fwd(x, kernel):
    return _pointwise(x, kernel), (x, kernel)


def _pointwise_cpu_bwd(res, dy):
    x, kernel = res
    dx = jnp.einsum("nhwd,cd->nhwc", dy, kernel.astype(dy.dtype))
    x2, d2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    dk = jnp.dot(x2.T, d2, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


_pointwise_cpu.defvjp(_pointwise_cpu_fwd, _pointwise_cpu_bwd)


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


def check_group_size(batch: int, group_size: int, axis_name: str | None = None) -> int:
    """The number of examples each ghost-BN group normalises over: 0 (the whole batch) or `group_size`.

    A group as large as the batch is the whole batch (0). ValueError when `group_size` does not
    divide `batch`, or when combined with cross-device statistics (`axis_name`).
    """
    g = int(group_size or 0)
    if g < 0:
        raise ValueError(f"BN group size must be >= 0 (0: the whole batch), got {g}")
    if g == 0 or g == batch:
        return 0
    if axis_name is not None:
        raise ValueError(f"BN group size {g} with statistics over the devices of axis {axis_name!r} (sync_bn): "
                         f"ghost BN groups are per device; use one or the other")
    if batch % g:
        raise ValueError(f"the batch of {batch} examples is not divisible by the BN group size {g}")
    return g


def batch_norm(x: Array, p: dict, s: dict, mask: Array, *, train: bool, eps: float,
               axis_name: str | None = None, group_size: int = 0) -> tuple[Array, dict | None]:
    """BN restricted to the active channels; inactive channels come out exactly zero.

    Train mode normalises with the batch mean and biased variance and returns this
    batch's statistics as {'mean', 'var' (unbiased)}: what a PyTorch BN with
    momentum 1 would store, so averaging them over batches is the reference's
    cumulative-average calibration (spec §7). Eval mode uses the stored `s`.

    `group_size` g > 0 (train mode; ghost / virtual-batch BN): each group of g consecutive
    examples is normalised with its own statistics, exactly as g examples on their own would be
    (the reference's per-GPU BN over 32 images, whatever the batch here). It then returns the
    average over the groups of each group's mean and unbiased variance: what calibrating on the
    groups as separate batches would give. 0, or g equal to the batch, normalises over the whole
    batch. Not combined with `axis_name`.
    """
    g = check_group_size(x.shape[0], group_size, axis_name) if train else 0
    if g:
        return _ghost_batch_norm(x, p, s, mask, eps=eps, group_size=g)
    if train:
        mean, var, n = batch_stats(x, axis_name)
        mean, var = save(mean, SAVED_BN_STATS), save(var, SAVED_BN_STATS)
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


def _ghost_batch_norm(x: Array, p: dict, s: dict, mask: Array, *, eps: float, group_size: int
                      ) -> tuple[Array, dict]:
    """Train-mode `batch_norm` with statistics per group of `group_size` consecutive examples."""
    groups = x.shape[0] // group_size
    xf = x.astype(jnp.float32).reshape((groups, group_size) + x.shape[1:])
    n = np.prod(xf.shape[1:-1])
    mean = jnp.mean(xf, axis=(1, 2, 3), keepdims=True)  # [groups, 1, 1, 1, C]
    var = jnp.mean(jnp.square(xf - mean), axis=(1, 2, 3), keepdims=True)
    mean, var = save(mean, SAVED_BN_STATS), save(var, SAVED_BN_STATS)
    unbiased = var * (n / jnp.maximum(n - 1, 1))
    new = {"mean": jnp.where(mask, jnp.mean(mean, axis=(0, 1, 2, 3)), s["mean"]),
           "var": jnp.where(mask, jnp.mean(unbiased, axis=(0, 1, 2, 3)), s["var"])}
    scale = p["scale"] * jax.lax.rsqrt(var + eps)
    shift = p["bias"] - mean * scale
    y = (xf * scale + shift).reshape(x.shape)
    y = jnp.where(mask, y, 0.0)
    return y.astype(x.dtype), new


def classifier(x: Array, kernel: Array, bias: Array) -> Array:
    """The final linear layer in float32 whatever x's dtype: float32 inputs, weights, accumulation and logits.

    Its inputs are upcast (not its output): bfloat16 logits would carry ~3 significant digits into
    the softmax and the losses. `Precision.HIGHEST` keeps it float32 where the backend would
    otherwise round float32 matmul inputs (e.g. TF32 on GPUs); on CPU it changes nothing.
    """
    return jnp.dot(x.astype(jnp.float32), kernel.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST) + bias.astype(jnp.float32)


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


def prefix_scan(f, x: Array, params: Any, aux: Any, n: Any) -> Array:
    """x after `x = f(x, params[i], aux[i])` for i < n (n traced, at most the stacks' length).

    Depth-inactive blocks are a suffix of their stage, so a stage runs as a loop over its active
    prefix: the other blocks cost nothing, forward or backward. Differentiable in x and `params`
    (`aux` gets no gradient): the forward stashes each active step's VJP residuals, the backward
    runs the active steps' VJPs in reverse. Residuals that are the step's own parameters or aux
    (forwarded inputs) are not stashed: the backward slices them again from the stacks. (A
    `lax.cond` inside a `lax.scan` does the same arithmetic but measured slower on CPU than
    computing every block: it writes the skipped steps' residuals as zeros and copies the taken
    ones', benchmarks/RESULTS.md.)
    """
    box: dict[str, Any] = {}  # the residuals' structure, from the forward's trace to the backward's
    at = lambda tree, i: jax.tree.map(lambda a: a[i], tree)  # noqa: E731

    def step_vjp(x, p, a):
        """(y, the residuals to stash); box["where"] records which residuals are forwarded inputs."""
        y, vjp = jax.vjp(lambda x, p: f(x, p, a), x, p)
        leaves, box["tree"] = jax.tree.flatten(vjp)
        position = {id(v): k for k, v in enumerate(jax.tree.leaves((p, a)))}  # forwarded inputs
        stash = [leaf for leaf in leaves if id(leaf) not in position]
        box["where"] = [position.get(id(leaf)) for leaf in leaves]  # None: the next stashed residual
        return y, stash

    def residuals(stash, params, aux, i):
        inputs, stashed = jax.tree.leaves((at(params, i), at(aux, i))), iter(s[i] for s in stash)
        return [next(stashed) if k is None else inputs[k] for k in box["where"]]

    def loop(x, params, aux, n, stash):
        def body(i, carry):
            x, stash = carry
            if stash is None:  # no gradient wanted: just the blocks
                return f(x, at(params, i), at(aux, i)), None
            y, leaves = step_vjp(x, at(params, i), at(aux, i))
            return y, [jax.lax.dynamic_update_index_in_dim(s, like_varying(r, s), i, 0) for s, r in zip(stash, leaves)]

        return jax.lax.fori_loop(0, n, body, (x, stash))

    @jax.custom_vjp
    def run(x, params, aux, n):
        return loop(x, params, aux, n, None)[0]

    def run_fwd(x, params, aux, n):
        shapes = jax.eval_shape(lambda x, p, a: step_vjp(x, p, a)[1], x, at(params, 0), at(aux, 0))
        length = jax.tree.leaves(params)[0].shape[0]
        stash = [like_varying(jnp.zeros((length,) + s.shape, s.dtype), x) for s in shapes]
        y, stash = loop(x, params, aux, n, stash)
        return y, (stash, params, aux, n)

    def run_bwd(res, dy):
        stash, params, aux, n = res

        def body(k, carry):
            i = n - 1 - k
            dx, grads = carry
            dx, g = jax.tree.unflatten(box["tree"], residuals(stash, params, aux, i))(dx)
            return dx, jax.tree.map(lambda buf, v: jax.lax.dynamic_update_index_in_dim(buf, like_varying(v, buf), i, 0),
                                    grads, g)

        zeros = jax.tree.map(lambda p: like_varying(jnp.zeros_like(p), dy), params)
        dx, grads = jax.lax.fori_loop(0, n, body, (dy, zeros))
        return dx, grads, jax.tree.map(lambda _: None, aux), None

    run.defvjp(run_fwd, run_bwd)
    # Host (numpy) encodings, as an un-jitted apply passes them, become arrays the loop can index.
    aux = jax.tree.map(jnp.asarray, aux)
    return run(x, jax.tree.map(lambda p: like_varying(p, x), params), aux, jnp.asarray(n))
