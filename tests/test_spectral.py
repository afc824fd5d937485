"""Exact math of principal kernels (docs/algorithm.md §1, §3)."""

import numpy as np
import pytest

from prism_tf import spectral


@pytest.fixture
def kernel():
    return np.random.default_rng(0).normal(size=(3, 3, 5, 7)).astype(np.float32)


def test_factorize_shapes_orthogonality_and_exact_rebuild(kernel):
    a, b, s = spectral.factorize_kernel(kernel)
    assert a.shape == (3, 3, 5, 7) and b.shape == (7, 7) and s.shape == (7,)
    assert np.all(np.diff(s.numpy()) <= 0)
    np.testing.assert_allclose(spectral.rebuild_kernel(a, b), kernel, rtol=0, atol=1e-5)
    # A = U √s  =>  AᵀA = diag(s); B = √s Vᵀ  =>  BBᵀ = diag(s)
    am = spectral.kernel_to_matrix(a).numpy()
    np.testing.assert_allclose(am.T @ am, np.diag(s.numpy()), atol=1e-4)
    np.testing.assert_allclose(b.numpy() @ b.numpy().T, np.diag(s.numpy()), atol=1e-4)
    # singular values equal numpy's
    np.testing.assert_allclose(s, np.linalg.svd(kernel.reshape(45, 7), compute_uv=False), rtol=1e-5)


def test_dense_kernel_with_rank_limited_by_rows():
    w = np.random.default_rng(1).normal(size=(4, 9)).astype(np.float32)
    a, b, s = spectral.factorize_kernel(w)
    assert a.shape == (4, 4) and b.shape == (4, 9) and s.shape == (4,)
    np.testing.assert_allclose(spectral.rebuild_kernel(a, b), w, atol=1e-5)


def test_refactorize_restores_orthogonality_and_keeps_function(kernel):
    a, b, _ = spectral.factorize_kernel(kernel)
    rng = np.random.default_rng(2)
    a2 = a.numpy() + 0.1 * rng.normal(size=a.shape).astype(np.float32)
    b2 = b.numpy() + 0.1 * rng.normal(size=b.shape).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, size=7).astype(np.float32)
    a3, b3, s3 = spectral.refactorize(a2, b2, scale)
    expected = spectral.rebuild_kernel(a2, scale[:, None] * b2).numpy()
    np.testing.assert_allclose(spectral.rebuild_kernel(a3, b3), expected, atol=1e-5)
    am = spectral.kernel_to_matrix(a3).numpy()
    np.testing.assert_allclose(am.T @ am, np.diag(s3.numpy()), atol=1e-4)


def test_gather_kernels(kernel):
    a, b, _ = spectral.factorize_kernel(kernel)
    ga, gb = spectral.gather_kernels(a, b, [5, 1])
    np.testing.assert_array_equal(ga.numpy(), a.numpy()[..., [5, 1]])
    np.testing.assert_array_equal(gb.numpy(), b.numpy()[[5, 1]])


def test_float32_svd_matches_float64_to_float32_precision(kernel):
    import tensorflow as tf

    a, b, s = spectral.refactorize(*spectral.factorize_kernel(kernel)[:2])
    a32, b32, s32 = spectral.refactorize(a, b, svd_dtype=tf.float32)
    np.testing.assert_allclose(spectral.rebuild_kernel(a32, b32), spectral.rebuild_kernel(a, b), atol=1e-5)
    np.testing.assert_allclose(s32, s, rtol=1e-5)
    assert a32.dtype == tf.float32 and s32.dtype == tf.float32


def test_batched_refactorization_equals_one_layer_at_a_time():
    rng = np.random.default_rng(3)
    shapes = [((3, 3, 5), 7, 7), ((3, 3, 5), 7, 7), ((4,), 9, 4), ((3, 3, 5), 7, 3)]  # two share a shape
    factors = [(rng.normal(size=(*lead, rank)).astype(np.float32), rng.normal(size=(rank, out)).astype(np.float32))
               for lead, out, rank in shapes]
    for (a, b, s), (a1, b1, s1) in zip(spectral.refactorize_many(factors),
                                       [spectral.refactorize(a, b) for a, b in factors], strict=True):
        assert a.shape == a1.shape and b.shape == b1.shape and s.shape == s1.shape
        np.testing.assert_allclose(s, s1, rtol=1e-6)
        np.testing.assert_allclose(spectral.rebuild_kernel(a, b), spectral.rebuild_kernel(a1, b1), atol=1e-5)
