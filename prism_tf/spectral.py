"""Spectral math of principal kernels: reshapes, SVD, rebuild, slicing and per-kernel averaging.

Pure functions in TensorFlow ops (they run eagerly on numpy input and inside TFF/`tf.function` graphs alike), so
the Keras layers, the TFF computations and the device-ingest path all call this one implementation
(docs/algorithm.md §1, §3). No Keras, no state.

Conventions (docs/algorithm.md §1): a kernel of shape ``[kh, kw, Cin, Cout]`` (or ``[in, out]`` for Dense) is viewed
as the
matrix ``W = [kh*kw*Cin, Cout]``. Its thin SVD ``W = U diag(s) Vᵀ`` is split as ``A = U diag(√s)`` (reshaped back to
``[kh, kw, Cin, r]``: ``r`` ordinary filters, the *principal kernels*) and ``B = diag(√s) Vᵀ`` (``[r, Cout]``, the
1×1 map that mixes their responses into the outputs).
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

TensorLike = tf.types.experimental.TensorLike


def kernel_to_matrix(kernel: TensorLike) -> tf.Tensor:
    """``[..., Cout]`` kernel -> ``[prod(...), Cout]`` matrix (docs/algorithm.md §1)."""
    kernel = tf.convert_to_tensor(kernel)
    return tf.reshape(kernel, [-1, tf.shape(kernel)[-1]])


def matrix_to_kernel(matrix: TensorLike, leading_shape: Sequence[int]) -> tf.Tensor:
    """``[prod(leading_shape), n]`` matrix -> ``[*leading_shape, n]`` kernel (inverse of `kernel_to_matrix`)."""
    matrix = tf.convert_to_tensor(matrix)
    return tf.reshape(matrix, [*leading_shape, tf.shape(matrix)[-1]])


def factorize_kernel(kernel: TensorLike, svd_dtype: tf.DType = tf.float64) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Split a kernel into principal kernels ``A``, combination ``B`` and singular values ``s`` (docs/algorithm.md §1).

    Args:
      kernel: ``[kh, kw, Cin, Cout]`` or ``[in, out]``.

    Returns:
      ``(A, B, s)`` with ``A`` of shape ``[kh, kw, Cin, r]`` (or ``[in, r]``), ``B`` of shape ``[r, Cout]`` and
      ``s`` of shape ``[r]`` sorted descending, ``r = min(rows, Cout)``; ``A @ B`` (as matrices) equals the kernel.
      The SVD runs in ``svd_dtype`` (float64 by default; bench/speed.py measures float32's time and error) and
      the results are cast back to the kernel's dtype.
    """
    kernel = tf.convert_to_tensor(kernel)
    leading = kernel.shape[:-1]
    s, u, v = tf.linalg.svd(tf.cast(kernel_to_matrix(kernel), svd_dtype), full_matrices=False)
    root = tf.sqrt(s)
    a = u * root[tf.newaxis, :]
    b = root[:, tf.newaxis] * tf.transpose(v)
    dtype = kernel.dtype
    return tf.cast(matrix_to_kernel(a, leading), dtype), tf.cast(b, dtype), tf.cast(s, dtype)


def rebuild_kernel(principal: TensorLike, combination: TensorLike) -> tf.Tensor:
    """``W = A·B`` in kernel shape: ``[kh, kw, Cin, r] x [r, Cout] -> [kh, kw, Cin, Cout]`` (docs/algorithm.md §1)."""
    principal = tf.convert_to_tensor(principal)
    matrix = tf.matmul(kernel_to_matrix(principal), tf.convert_to_tensor(combination, principal.dtype))
    return matrix_to_kernel(matrix, principal.shape[:-1])


def refactorize(
    principal: TensorLike, combination: TensorLike, scale: TensorLike | None = None,
    svd_dtype: tf.DType = tf.float64,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Rebuild ``W = A diag(ω) B`` and re-run the SVD, re-splitting ``√s`` into both factors (docs/algorithm.md §1, §3).

    Training drifts the principal kernels away from orthogonality; the server restores it after aggregation.
    ``scale`` (the frozen multipliers ω, docs/algorithm.md §2) defaults to ones. Rank is preserved when
    ``r = min(rows, Cout)``; a lower-rank layer keeps its ``r`` leading terms.
    """
    principal = tf.convert_to_tensor(principal)
    combination = tf.convert_to_tensor(combination, principal.dtype)
    if scale is not None:
        combination = tf.convert_to_tensor(scale, principal.dtype)[:, tf.newaxis] * combination
    rank = principal.shape[-1]
    a, b, s = factorize_kernel(rebuild_kernel(principal, combination), svd_dtype)
    return a[..., :rank], b[:rank], s[:rank]


def refactorize_many(
    factors: Sequence[tuple[TensorLike, TensorLike]], svd_dtype: tf.DType = tf.float64
) -> list[tuple[tf.Tensor, tf.Tensor, tf.Tensor]]:
    """`refactorize` (without ω) of several layers' ``(A, B)``, one batched SVD per distinct matrix shape.

    Equal to calling `refactorize` on each pair; layers whose ``W`` matrices share a shape (a ResNet's blocks of a
    stage) go through one ``tf.linalg.svd`` call (bench/speed.py measures both forms).
    """
    matrices, by_shape = [], {}
    for i, (principal, combination) in enumerate(factors):
        principal = tf.convert_to_tensor(principal)
        matrix = kernel_to_matrix(rebuild_kernel(principal, combination))
        matrices.append((principal, matrix))
        by_shape.setdefault((tuple(principal.shape[:-1]), tuple(combination.shape)), []).append(i)
    out: list = [None] * len(matrices)
    for members in by_shape.values():
        stack = tf.cast(tf.stack([matrices[i][1] for i in members]), svd_dtype)
        s, u, v = tf.linalg.svd(stack, full_matrices=False)
        root = tf.sqrt(s)
        a_all = u * root[:, tf.newaxis, :]
        b_all = root[:, :, tf.newaxis] * tf.transpose(v, [0, 2, 1])
        for j, i in enumerate(members):
            principal = matrices[i][0]
            rank, dtype = principal.shape[-1], principal.dtype
            out[i] = (tf.cast(matrix_to_kernel(a_all[j], principal.shape[:-1]), dtype)[..., :rank],
                      tf.cast(b_all[j], dtype)[:rank], tf.cast(s[j], dtype)[:rank])
    return out


def gather_kernels(
    principal: TensorLike, combination: TensorLike, indices: TensorLike
) -> tuple[tf.Tensor, tf.Tensor]:
    """The principal kernels ``indices`` of a layer: ``(A[..., idx], B[idx, :])`` (docs/algorithm.md §2)."""
    principal = tf.convert_to_tensor(principal)
    indices = tf.convert_to_tensor(indices, tf.int32)
    return tf.gather(principal, indices, axis=-1), tf.gather(combination, indices, axis=0)
