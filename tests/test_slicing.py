"""`prism_tf.slicing`: gathering, scattering and per-entry averaging of sub-tensors, by hand (docs/algorithm.md §3)."""

import numpy as np
import tensorflow as tf

from prism_tf import slicing


def test_slicing_math_by_hand():
    t = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    slices = [(1, [2, 0]), (2, [3])]
    sub = slicing.gather_axes(t, slices).numpy()
    np.testing.assert_array_equal(sub, t[:, [2, 0]][:, :, [3]])
    back = slicing.scatter_axes(sub, slices, t.shape).numpy()
    mask = slicing.coverage(slices, t.shape).numpy()
    assert mask.sum() == 4 and np.array_equal(back[mask == 1], t[mask == 1]) and np.all(back[mask == 0] == 0)
    sums, counts = slicing.weighted_sums(sub, slices, t.shape, 3.0)
    np.testing.assert_array_equal(slicing.masked_average(sums, counts, -np.ones_like(t)), np.where(mask, t, -1))


def test_per_key_average_by_hand():
    # Two clients over 4 keys; client 1 (weight 3) has keys 0,2; client 2 (weight 1) has keys 2,3; key 1: nobody.
    previous = np.array([[10.0], [20.0], [30.0], [40.0]])
    s1, c1 = slicing.weighted_sums(np.array([[1.0], [2.0]]), [(0, [0, 2])], (4, 1), 3.0)
    s2, c2 = slicing.weighted_sums(np.array([[6.0], [8.0]]), [(0, [2, 3])], (4, 1), 1.0)
    np.testing.assert_array_equal((c1 + c2).numpy()[:, 0], [3.0, 0.0, 4.0, 1.0])
    avg = slicing.masked_average(s1 + s2, c1 + c2, previous).numpy()
    np.testing.assert_allclose(avg[:, 0], [1.0, 20.0, (3 * 2.0 + 6.0) / 4, 8.0])


def test_slicing_traces_in_graph_and_rows_round_trip():
    @tf.function(input_signature=[tf.TensorSpec([2, 3]), tf.TensorSpec([2], tf.int32)])
    def run(values, keys):
        sums, counts = slicing.weighted_sums(values, [(0, keys)], (5, 3), 2.0)
        return slicing.masked_average(sums, counts, tf.zeros([5, 3]))

    out = run(tf.ones([2, 3]), tf.constant([4, 1])).numpy()
    np.testing.assert_array_equal(out[[1, 4]], np.ones([2, 3]))
    np.testing.assert_array_equal(out[[0, 2, 3]], np.zeros([3, 3]))
    t = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    rows = slicing.to_rows(t, 1)
    assert rows.shape == (4, 15)
    np.testing.assert_array_equal(slicing.from_rows(rows, 1, t.shape), t)
    np.testing.assert_array_equal(slicing.from_rows(tf.gather(rows, [3, 0]), 1, (3, 2, 5)), t[:, [3, 0]])
