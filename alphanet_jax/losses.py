"""Distillation and classification losses of AlphaNet (arXiv 2102.07954) in JAX.

Ports of the reference ``facebookresearch/AlphaNet:loss_ops.py`` (spec §6.2, §6.3):

* :func:`alpha_divergence`: ``f_divergence``; per-example clipped D_alpha(p||q).
* :func:`adaptive_alpha_divergence`: ``AdaptiveLossSoft``; per example the larger
  of D_alpha_min and D_alpha_max.
* :func:`soft_cross_entropy`: ``KLLossSoft`` without labels (plain KD).
* :func:`label_smoothed_cross_entropy`: ``CrossEntropyLossSmooth``.

Here p = softmax(teacher logits) and q = softmax(student logits). Every function
returns one float32 value per example (the shape of the logits without the last,
class, axis), so take ``.mean()`` yourself to get the reference's batch mean.

Conventions:

* Classes are on the last axis; any leading batch shape works. The functions
  work under ``jit``, ``vmap``, ``grad`` and inside ``shard_map``. bf16/fp16 (and
  integer) logits are computed in float32 and the result is float32 (float64 stays
  float64 when x64 is enabled).
* The teacher always gets a zero gradient: the reference detaches p.
* The two alpha losses use ``jax.custom_vjp`` with the closed-form surrogate
  gradient q_j (S - rho_j), S = sum_c q_c rho_c. We never differentiate through the
  clipped importance weights. ``custom_vjp`` functions support reverse mode
  (``grad``/``vjp``), not forward mode (``jvp``/``jacfwd``).
* ``alpha``, ``alpha_min``, ``alpha_max`` and ``iw_clip`` must be Python numbers.
  They select code branches and are static (``nondiff_argnums``). Under ``jit``,
  bind them with ``functools.partial`` or ``static_argnums``.

Where the reference returns NaN/inf, we return the limit instead. Everything
is computed in log space: log w = log_softmax(teacher) - log_softmax(student) is
finite whenever the logits are finite, even when a softmax probability underflows
to 0. (The reference uses float32 softmax and w = p / q.) Concretely:

* alpha ~ 1, p_c underflows to 0: the reference computes 0 * log 0 = NaN. We use the
  limit 0 (the value is sum_c p_c log w_c, i.e. KL(p||q) of the unrounded softmax).
* alpha ~ 1, q_c underflows to 0: the reference gets w = inf and a NaN value and
  gradient. We return the finite KL value and the gradient q - p.
* p_c = q_c = 0 (any alpha): the reference gets w = 0/0 = NaN. For us the term
  contributes 0.
* alpha ~ 0, p_c = 0 < q_c: the reference gives -log 0 = +inf and a NaN gradient.
  We return the finite (possibly large) value -sum q min(log w, log iw_clip) and its
  gradient.
* Adaptive choice: a NaN alpha_max value makes the reference's ``>`` false, so
  it picks alpha_max. Our values are finite, so we compare the limit values and may
  pick alpha_min in exactly those examples. Elsewhere the choice is identical.

Non-finite logits (inf/NaN) are not handled; they propagate.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "alpha_divergence",
    "adaptive_alpha_divergence",
    "soft_cross_entropy",
    "label_smoothed_cross_entropy",
]

# Width of the reference's alpha ~ 0 and alpha ~ 1 special-case windows.
_ALPHA_EPS = 1e-3


def _static_float(name: str, value: Any) -> float:
    """Validate a static Python number (not bool, not an array) and return it as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"{name} must be a Python float or int (it is static and selects a code "
            f"branch), got {type(value).__name__}: {value!r}. Under jit, pass it via "
            "functools.partial or static_argnums instead of as a traced argument."
        )
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _positive_float(name: str, value: Any) -> float:
    """Validate a static, strictly positive Python number."""
    value = _static_float(name, value)
    if value <= 0.0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return value


def _compute_dtype(*arrays: jax.Array) -> jnp.dtype:
    """At least float32: low-precision logits are upcast, float64 is kept."""
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def _prepare_pair(student_logits: Any, teacher_logits: Any) -> tuple[jax.Array, jax.Array]:
    """Check shapes and cast both logits to the common float compute dtype."""
    student = jnp.asarray(student_logits)
    teacher = jnp.asarray(teacher_logits)
    if student.shape != teacher.shape:
        raise ValueError(
            "student_logits and teacher_logits must have the same shape, got "
            f"student_logits.shape={student.shape} and teacher_logits.shape={teacher.shape}"
        )
    if student.ndim == 0 or student.shape[-1] == 0:
        raise ValueError(
            f"logits need a non-empty class axis (the last one), got shape {student.shape}"
        )
    dtype = _compute_dtype(student, teacher)
    return student.astype(dtype), teacher.astype(dtype)


def _divergence_and_grad(
    log_q: jax.Array, log_p: jax.Array, alpha: float, iw_clip: float, with_grad: bool
) -> tuple[jax.Array, jax.Array | None]:
    """One ``f_divergence`` branch: per-example value and d value / d student logits.

    The gradient is the reference's surrogate gradient q_j (S - rho_j). The
    constant parts of rho (f_base, the -1 of the alpha ~ 0 branch) cancel
    analytically because sum_c q_c = 1, so they are dropped for accuracy.
    """
    q = jnp.exp(log_q)
    log_w = log_p - log_q  # log importance ratio, finite for finite logits
    log_clip = math.log(iw_clip)
    grad = None
    if abs(alpha) < _ALPHA_EPS:
        # w clamped to [0, iw_clip]; f = -log w; rho = log w - 1.
        lw = jnp.minimum(log_w, log_clip)
        s = jnp.sum(q * lw, axis=-1)
        value = -s
        if with_grad:
            grad = q * (s[..., None] - lw)
    elif abs(alpha - 1.0) < _ALPHA_EPS:
        # f = w log w, rho = w, no clipping. q * w = p, hence the forms below.
        p = jnp.exp(log_p)
        value = jnp.sum(p * log_w, axis=-1)
        if with_grad:
            grad = q - p
    else:
        # w_a = clamp(w^alpha, 0, iw_clip), clamped in log space (no overflow).
        a_lw = jnp.minimum(alpha * log_w, log_clip)
        scale = 1.0 / (alpha * (alpha - 1.0))
        value = scale * jnp.sum(q * jnp.expm1(a_lw), axis=-1)  # sum q (w_a - 1)
        if with_grad:
            w_a = jnp.exp(a_lw)
            s = jnp.sum(q * w_a, axis=-1)
            grad = q * (s[..., None] - w_a) / alpha
    return value, grad


def _log_probs(student: jax.Array, teacher: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jax.nn.log_softmax(student, axis=-1), jax.nn.log_softmax(teacher, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _alpha_div(student: jax.Array, teacher: jax.Array, alpha: float, iw_clip: float) -> jax.Array:
    value, _ = _divergence_and_grad(*_log_probs(student, teacher), alpha, iw_clip, False)
    return value


def _alpha_div_fwd(student, teacher, alpha, iw_clip):
    value, grad = _divergence_and_grad(*_log_probs(student, teacher), alpha, iw_clip, True)
    return value, grad


def _alpha_div_bwd(alpha, iw_clip, grad, ct):
    del alpha, iw_clip
    return ct[..., None] * grad, jnp.zeros_like(grad)


_alpha_div.defvjp(_alpha_div_fwd, _alpha_div_bwd)


def alpha_divergence(
    student_logits: jax.typing.ArrayLike,
    teacher_logits: jax.typing.ArrayLike,
    alpha: float,
    iw_clip: float = 5.0,
) -> jax.Array:
    """Per-example clipped alpha-divergence D_alpha(p||q), the value of ``f_divergence``.

    p = softmax(teacher_logits), q = softmax(student_logits), w = p / q:

    * general alpha: w_a = clamp(w^alpha, 0, iw_clip), value = sum q (w_a - 1) / (alpha (alpha - 1));
    * |alpha| < 1e-3: w clamped to [0, iw_clip], value = -sum q log w (KL(q||p) if unclipped);
    * |alpha - 1| < 1e-3: value = sum q w log w = KL(p||q), never clipped.

    The gradient w.r.t. the student logits is the reference's surrogate gradient
    q_j (S - rho_j), S = sum_c q_c rho_c. It is in closed form, with the clipped
    weights held constant. It is the exact gradient wherever no clipping is
    active (alpha = 1 gives q - p). The teacher gets a zero gradient.

    Sign of the clipped alpha = -1 divergence: with iw_clip >= 2 (the default
    is 5) it is never negative. Let a be the student mass on clipped classes (q/p > c,
    c = iw_clip) and b < a their teacher mass. Cauchy-Schwarz on the other
    classes gives sum q^2/p >= (1-a)^2/(1-b) >= (1-a)^2. So
    sum q w_a >= c a + (1-a)^2 = 1 + (c-2) a + a^2 >= 1, and the value is >= 0
    up to float rounding. With iw_clip < 2 it can be negative: iw_clip = 1.5,
    q = (0.25, 0.75), p = (0.001, 0.999) gives about -0.031. (For alpha > 1,
    clipping can also make the value negative, as in the reference.)

    Args:
      student_logits: [..., K] logits of the student (gradient flows here).
      teacher_logits: [..., K] logits of the teacher (treated as constant).
      alpha: Python float (static).
      iw_clip: Python float > 0, upper clamp of the importance weights (static).

    Returns:
      float32 array of shape ``student_logits.shape[:-1]``.
    """
    alpha = _static_float("alpha", alpha)
    iw_clip = _positive_float("iw_clip", iw_clip)
    student, teacher = _prepare_pair(student_logits, teacher_logits)
    return _alpha_div(student, teacher, alpha, iw_clip)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _adaptive(student, teacher, alpha_min, alpha_max, iw_clip):
    value, _ = _adaptive_fwd(student, teacher, alpha_min, alpha_max, iw_clip)
    return value


def _adaptive_fwd(student, teacher, alpha_min, alpha_max, iw_clip):
    log_q, log_p = _log_probs(student, teacher)
    left, grad_left = _divergence_and_grad(log_q, log_p, alpha_min, iw_clip, True)
    right, grad_right = _divergence_and_grad(log_q, log_p, alpha_max, iw_clip, True)
    pick_left = left > right  # strictly greater, as torch.gt in the reference
    value = jnp.where(pick_left, left, right)
    grad = jnp.where(pick_left[..., None], grad_left, grad_right)
    return value, grad


def _adaptive_bwd(alpha_min, alpha_max, iw_clip, grad, ct):
    del alpha_min, alpha_max, iw_clip
    return ct[..., None] * grad, jnp.zeros_like(grad)


_adaptive.defvjp(_adaptive_fwd, _adaptive_bwd)


def adaptive_alpha_divergence(
    student_logits: jax.typing.ArrayLike,
    teacher_logits: jax.typing.ArrayLike,
    alpha_min: float = -1.0,
    alpha_max: float = 1.0,
    iw_clip: float = 5.0,
) -> jax.Array:
    """Per-example adaptive alpha-divergence of AlphaNet (``AdaptiveLossSoft``).

    Per example, computes D_alpha_min and D_alpha_max (as :func:`alpha_divergence`,
    both with ``iw_clip``). Returns D_alpha_min where it is strictly greater than
    D_alpha_max, and D_alpha_max otherwise (ties go to alpha_max). The gradient
    w.r.t. the student logits is the chosen branch's surrogate gradient. The
    teacher gets a zero gradient.

    Difference from the reference: the reference returns the batch mean of the
    chosen *surrogates* -sum q rho log q. That number is not a divergence, but
    it has the right gradient. Here we return the per-example chosen
    *divergence values*, whose gradient equals the surrogate's. Hence
    ``adaptive_alpha_divergence(s, t).mean()`` has the same gradient as the
    reference loss, but a different (meaningful) value. Where the reference's
    alpha_max value is NaN (underflowed probabilities), we compare finite
    limit values instead (see the module docstring).

    Returns:
      float32 array of shape ``student_logits.shape[:-1]``.
    """
    alpha_min = _static_float("alpha_min", alpha_min)
    alpha_max = _static_float("alpha_max", alpha_max)
    iw_clip = _positive_float("iw_clip", iw_clip)
    student, teacher = _prepare_pair(student_logits, teacher_logits)
    return _adaptive(student, teacher, alpha_min, alpha_max, iw_clip)


def soft_cross_entropy(
    student_logits: jax.typing.ArrayLike,
    teacher_logits: jax.typing.ArrayLike,
    temperature: float | jax.typing.ArrayLike = 1.0,
) -> jax.Array:
    """Per-example soft-target cross-entropy -sum p log q (the reference's ``KLLossSoft``).

    p = softmax(teacher / T), q = softmax(student / T). There is no T^2
    factor: the value is exactly the reference's label-free ``kd_loss``, which
    does not scale by T^2 either. The teacher is ``stop_gradient``-ed. The
    gradient w.r.t. the student logits is (q - p) / T. This is cross-entropy,
    not KL: it differs from KL(p||q) by the teacher entropy.

    Returns:
      float32 array of shape ``student_logits.shape[:-1]``.
    """
    if isinstance(temperature, (bool, int, float)):
        temperature = _positive_float("temperature", temperature)
    student, teacher = _prepare_pair(student_logits, teacher_logits)
    teacher = jax.lax.stop_gradient(teacher)
    p = jax.nn.softmax(teacher / temperature, axis=-1)
    log_q = jax.nn.log_softmax(student / temperature, axis=-1)
    return -jnp.sum(p * log_q, axis=-1)


def label_smoothed_cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    smoothing: float | jax.typing.ArrayLike = 0.1,
) -> jax.Array:
    """Per-example label-smoothed cross-entropy (``CrossEntropyLossSmooth``, spec §6.2).

    target = one_hot(labels) * (1 - smoothing) + smoothing / K (every class, the
    true one included, gets smoothing / K), loss = -sum target * log_softmax(logits).
    ``labels`` are integer class ids of shape ``logits.shape[:-1]``. Out-of-range
    ids cannot be detected under jit: they get an all-zero one-hot.

    Returns:
      float32 array of shape ``logits.shape[:-1]``.
    """
    if isinstance(smoothing, (bool, int, float)):
        smoothing = _static_float("smoothing", smoothing)
        if not 0.0 <= smoothing <= 1.0:
            raise ValueError(f"smoothing must be in [0, 1], got {smoothing!r}")
    x = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError(f"logits need a non-empty class axis (the last one), got shape {x.shape}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
    if labels.shape != x.shape[:-1]:
        raise ValueError(
            f"labels.shape={labels.shape} must equal logits.shape[:-1]; "
            f"logits.shape={x.shape}"
        )
    x = x.astype(_compute_dtype(x))
    num_classes = x.shape[-1]
    log_q = jax.nn.log_softmax(x, axis=-1)
    target = jax.nn.one_hot(labels, num_classes, dtype=x.dtype) * (1.0 - smoothing)
    target = target + smoothing / num_classes
    return -jnp.sum(target * log_q, axis=-1)
