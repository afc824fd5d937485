"""One local training step's gradient arithmetic, shared by the TFF client and the on-device (TFLite) step.

docs/algorithm.md §7 (the training recipe). Given the loss gradients of a sub-model's trainable variables, a step
forms ``g = ∇loss + frobenius`` → ``g *= ClipLR factor`` → global-norm clip → ``g += wd·w`` and then applies
SGD with momentum ``a ← μ·a + g``, ``w ← w − lr·a`` (`tff.learning.optimizers.build_sgdm`'s rule). The authors add
the Frobenius term before ``clip_grad_norm_`` and let ``torch.optim.SGD`` add weight decay after it.

Pure TensorFlow ops on the model's variables: the same functions run inside the TFF client computation
(`tff_pipelines.round.client_work`) and inside the exported TFLite ``train`` signature (`export.tflite`), so a
phone and a simulated client take the same step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import tensorflow as tf

from prism_tf import kinds, spectral
from prism_tf.kinds import kernel_groups, walk_layers


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """The gradient transformations of a local step (README "The federated process"; Niu et al. TMLR 2023).

    Attributes:
      clip_norm: global gradient-norm clip (the authors use 5); ``None`` disables it.
      clip_lr_tau: "ClipLR" of Korzhenkov & Louizos (2024): each kernel's factors learn at ``min(1, τ/ω)`` of the
        learning rate; a no-op where ``ω ≤ τ`` (always for ``prism``/``top``/``uniform``). ``None`` disables it.
      frobenius_decay: λ of the penalty ``λ/2·‖A·diag(ω)·B‖²_F`` on each principal layer's effective kernel
        (`frobenius_terms`); the factors themselves get no weight decay. 0 disables it.
      weight_decay: ``wd·w`` added to the gradients of every other Conv2D/Dense kernel (not biases, not
        normalization, not the factors). 0 disables it.
      kernel_lr_cap: balanced kernel learning rates (`kernel_lr_factors`): each principal kernel's factors learn at
        ``clip(s̄/s_i, 1/cap, cap)`` of the learning rate, so every kernel's product moves at the layer's mean
        rate instead of at its own ``s_i``. ``None`` (default) disables it.
    """

    clip_norm: float | None = 5.0
    clip_lr_tau: float | None = 10.0
    frobenius_decay: float = 0.0
    weight_decay: float = 0.0
    kernel_lr_cap: float | None = None


def frobenius_terms(principal: tf.Tensor, combination: tf.Tensor, scale: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Gradients of ``½‖A·diag(ω)·B‖²_F`` w.r.t. the factors: ``(A(B̃B̃ᵀ), diag(ω)(AᵀA)B̃)``, ``B̃ = diag(ω)B``.

    ``principal`` is ``A`` in kernel shape ``[kh, kw, Cin, k]`` (or ``[in, k]``); the first term comes back in that
    shape. ω = 1 gives the authors' ``A(BBᵀ)`` and ``(AᵀA)B`` (their ``utils/frob.py``).
    """
    principal = tf.convert_to_tensor(principal)
    a = spectral.kernel_to_matrix(principal)
    omega = tf.convert_to_tensor(scale, a.dtype)[:, tf.newaxis]
    b = omega * tf.convert_to_tensor(combination, a.dtype)
    grad_a = tf.matmul(a, tf.matmul(b, b, transpose_b=True))
    grad_b = omega * tf.matmul(tf.matmul(a, a, transpose_a=True), b)
    return spectral.matrix_to_kernel(grad_a, principal.shape[:-1]), grad_b


def frobenius_gradients(model: tf.keras.Model, variables: Sequence[tf.Variable], decay: float) -> list:
    """Per variable, ``decay`` times `frobenius_terms` for the factors of each principal layer, else ``None``."""
    if not decay:
        return [None] * len(variables)
    terms = {}
    for layer, pair in kernel_groups(model).values():
        f = layer.factors(pair)
        grad_a, grad_b = frobenius_terms(f.principal, f.combination, f.scale)
        terms[f.principal.ref()] = decay * grad_a
        terms[f.combination.ref()] = decay * grad_b
    return [terms.get(v.ref()) for v in variables]


def weight_decay_gradients(model: tf.keras.Model, variables: Sequence[tf.Variable], decay: float) -> list:
    """Per variable, ``decay·w`` for the kernels of Conv2D/Dense layers, else ``None`` (biases, norms, factors)."""
    if not decay:
        return [None] * len(variables)
    kernels = {v.ref() for layer in walk_layers(model) if (kind := kinds.covering_kind(layer))
               for v in kind.decayed(layer)}
    return [decay * tf.convert_to_tensor(v) if v.ref() in kernels else None for v in variables]


def clip_lr_factors(model: tf.keras.Model, variables: Sequence[tf.Variable], tau: float | None) -> list:
    """Per variable, ClipLR's ``min(1, τ/ω)`` shaped to broadcast along its kernel axis, else ``None``.

    ``A`` (``principal_kernels``) holds kernel ``i`` in its last axis, ``B`` (``combination``) in its first; ω is
    the layer's ``kernel_scale`` as the sub-model holds it.
    """
    if tau is None:
        return [None] * len(variables)
    return per_kernel_factors(model, variables, lambda f: tf.minimum(1.0, tau / tf.convert_to_tensor(f.scale)))


def per_kernel_factors(model: tf.keras.Model, variables: Sequence[tf.Variable], factor_of: Callable) -> list:
    """Per variable, ``factor_of(factors)`` (one value per kept kernel of a principal layer's factor pair) shaped to
    broadcast along the kernel axis of ``A`` (``principal_kernels``: its last) and of ``B`` (``combination``: its
    first), else ``None``."""
    factors = {}
    for layer, pair in kernel_groups(model).values():
        f = layer.factors(pair)
        factor = factor_of(f)
        factors[f.principal.ref()] = tf.reshape(factor, [1] * (len(f.principal.shape) - 1) + [-1])
        factors[f.combination.ref()] = tf.reshape(factor, [-1, 1])
    return [factors.get(v.ref()) for v in variables]


def kernel_lr_factors(model: tf.keras.Model, variables: Sequence[tf.Variable], cap: float | None) -> list:
    """Per variable, the balanced learning-rate factor ``clip(s̄/s_i, 1/cap, cap)`` of each principal kernel, shaped
    to broadcast along its kernel axis, else ``None`` (docs/algorithm.md §7, "Balanced kernel learning rates").

    With ``A = U√s`` and ``B = √sVᵀ``, a gradient step on the factors moves kernel ``i``'s product ``a_i b_iᵀ`` by
    about ``s_i`` times what the same step moves a plain kernel (the gradient w.r.t. ``a_i`` is ``G·b_i``, of norm
    ∝ ``√s_i``, and it multiplies ``b_i``): large-``s`` kernels learn fast and small ones barely move. Scaling both
    factors' gradients by ``s̄/s_i`` (``s_i = ‖a_i‖·‖b_i‖``, ``s̄`` its mean over the layer's kept kernels, both
    read from the current factors, so a device computes them from what it holds) gives every kernel the layer's
    mean rate.
    """
    if cap is None:
        return [None] * len(variables)

    def balanced(f) -> tf.Tensor:
        a = spectral.kernel_to_matrix(tf.convert_to_tensor(f.principal))
        s = tf.norm(a, axis=0) * tf.norm(tf.convert_to_tensor(f.combination), axis=1)
        return tf.stop_gradient(tf.clip_by_value(tf.reduce_mean(s) / tf.maximum(s, 1e-12), 1.0 / cap, cap))

    return per_kernel_factors(model, variables, balanced)


def step_gradients(
    model: tf.keras.Model, variables: Sequence[tf.Variable], loss_gradients: Sequence[tf.Tensor],
    options: StepOptions,
) -> list[tf.Tensor]:
    """The gradients a step applies: loss gradients + Frobenius decay, × ClipLR, × balanced kernel rates, global-norm
    clip, + weight decay."""
    grads = _plus(list(loss_gradients), frobenius_gradients(model, variables, options.frobenius_decay))
    grads = [g if f is None else g * f for g, f in zip(grads, clip_lr_factors(model, variables, options.clip_lr_tau),
                                                       strict=True)]
    grads = [g if f is None else g * f for g, f in zip(
        grads, kernel_lr_factors(model, variables, options.kernel_lr_cap), strict=True)]
    if options.clip_norm is not None:
        grads, _ = tf.clip_by_global_norm(grads, options.clip_norm)
    return _plus(list(grads), weight_decay_gradients(model, variables, options.weight_decay))


def _plus(grads: list, terms: list) -> list:
    return [g if t is None else g + t for g, t in zip(grads, terms, strict=True)]


__all__ = ["StepOptions", "clip_lr_factors", "frobenius_gradients", "frobenius_terms", "kernel_lr_factors",
           "step_gradients", "weight_decay_gradients"]
