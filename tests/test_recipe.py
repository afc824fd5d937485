"""The authors' local training recipe: learning-rate schedule, augmentation, normalization (exact numbers)."""

import collections
import dataclasses
import math

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from prism_tf.federated import recipe


def test_cosine_endpoints_and_midpoint():
    assert recipe.cosine_lr(0, 11, 0.1) == pytest.approx(0.1, abs=1e-15)
    assert recipe.cosine_lr(10, 11, 0.1) == pytest.approx(1e-4, abs=1e-15)
    assert recipe.cosine_lr(5, 11, 0.1) == pytest.approx((0.1 + 1e-4) / 2, abs=1e-15)
    quarter = 1e-4 + (0.1 - 1e-4) * 0.5 * (1 + math.cos(math.pi / 4))
    assert recipe.cosine_lr(1, 5, 0.1, final_lr=1e-4) == pytest.approx(quarter, abs=1e-15)
    assert recipe.cosine_lr(50, 11, 0.1) == pytest.approx(1e-4, abs=1e-15)  # past the end: final
    assert recipe.cosine_lr(0, 1, 0.1) == 0.1
    with pytest.raises(ValueError, match="total_rounds"):
        recipe.cosine_lr(0, 0, 0.1)


def test_schedule_objects():
    cosine = recipe.Schedule("cosine", base=0.1, final=1e-4, total_rounds=11)
    assert [cosine(t) for t in (0, 5, 10)] == [recipe.cosine_lr(t, 11, 0.1) for t in (0, 5, 10)]
    assert recipe.Schedule("constant", base=0.05)(123) == 0.05
    with pytest.raises(ValueError, match="kind"):
        recipe.Schedule("step")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cosine.base = 0.2


def _image(h=6, w=5, c=2):
    return tf.reshape(tf.range(1, h * w * c + 1, dtype=tf.float32), [h, w, c])


def test_crop_and_flip_exact_pixels():
    x = _image().numpy()
    same = recipe.crop_and_flip(x, tf.constant(4), tf.constant(4), tf.constant(False)).numpy()
    np.testing.assert_array_equal(same, x)
    # top=5, left=2: the image moves up one row and right two columns; zeros enter at the bottom and left
    shifted = recipe.crop_and_flip(x, tf.constant(5), tf.constant(2), tf.constant(False)).numpy()
    want = np.zeros_like(x)
    want[:-1, 2:] = x[1:, :-2]
    np.testing.assert_array_equal(shifted, want)
    flipped = recipe.crop_and_flip(x, tf.constant(5), tf.constant(2), tf.constant(True)).numpy()
    np.testing.assert_array_equal(flipped, want[:, ::-1])
    corner = recipe.crop_and_flip(x, tf.constant(0), tf.constant(8), tf.constant(False)).numpy()
    want = np.zeros_like(x)
    want[4:, :1] = x[:2, 4:]
    np.testing.assert_array_equal(corner, want)


def test_augment_example_deterministic_and_seed_dependent():
    x = tf.cast(_image(32, 32, 3), tf.uint8)
    a = recipe.augment_example(x, tf.constant([3, 7], tf.int64))
    b = recipe.augment_example(x, tf.constant([3, 7], tf.int64))
    assert a.shape == x.shape and a.dtype == tf.uint8
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    top, left, flip = recipe.augment_params(tf.constant([3, 7], tf.int64))
    np.testing.assert_array_equal(a.numpy(), recipe.crop_and_flip(x, top, left, flip).numpy())
    outs = {recipe.augment_example(x, tf.constant([3, s], tf.int64)).numpy().tobytes() for s in range(20)}
    assert len(outs) > 10
    params = np.array([[int(v) for v in recipe.augment_params(tf.constant([0, s]))] for s in range(400)])
    assert params[:, :2].min() == 0 and params[:, :2].max() == 8  # offsets cover [0, 2·pad]
    assert 0.35 < params[:, 2].mean() < 0.65


def _examples(n=6, shape=(8, 8, 3)):
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(n, *shape)).astype(np.float32)
    y = np.arange(n, dtype=np.int32)
    return tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=x, y=y))


def _as_arrays(ds):
    return np.stack([e["x"].numpy() for e in ds]), np.array([e["y"].numpy() for e in ds])


def test_augment_dataset_per_element_seeds_and_inside_tff():
    ds = _examples()
    x0, y0 = _as_arrays(ds)
    aug = recipe.augment_dataset(ds, seed=11)
    x1, y1 = _as_arrays(aug)
    x2, _ = _as_arrays(aug)  # a second pass: the same images
    x3, _ = _as_arrays(recipe.augment_dataset(ds, seed=12))
    np.testing.assert_array_equal(y1, y0)
    np.testing.assert_array_equal(x1, x2)
    assert not np.array_equal(x1, x3) and not np.array_equal(x1, x0)
    for i in range(len(x0)):
        want = recipe.augment_example(x0[i], tf.constant([11, i], tf.int64)).numpy()
        np.testing.assert_array_equal(x1[i], want)
    element = tff.types.tensorflow_to_type(aug.element_spec)

    @tff.tensorflow.computation(tff.SequenceType(element))
    def total(data):
        return data.reduce(tf.constant(0.0), lambda acc, e: acc + tf.reduce_sum(e["x"] * tf.range(1.0, 4.0)))

    assert total(aug) == pytest.approx(float((x1 * np.arange(1.0, 4.0)).sum()), rel=1e-6)


def test_client_seed_is_stable_and_distinct():
    assert recipe.client_seed(0, 1, 2) == recipe.client_seed(0, 1, 2)
    seeds = {recipe.client_seed(r, t, c) for r in range(2) for t in range(3) for c in range(4)}
    assert len(seeds) == 24 and all(0 <= s < 2**63 for s in seeds)


def test_channel_stats_and_normalize_exact():
    x = np.array([[[[0, 10], [255, 20]], [[51, 30], [102, 40]]]], np.uint8)  # [1, 2, 2, 2]
    mean, std = recipe.channel_stats(x)
    c0, c1 = np.array([0, 255, 51, 102]) / 255.0, np.array([10, 20, 30, 40]) / 255.0
    np.testing.assert_allclose(mean, [c0.mean(), c1.mean()], rtol=1e-6)
    np.testing.assert_allclose(std, [c0.std(), c1.std()], rtol=1e-6)
    floats = x.astype(np.float32) / 255.0
    np.testing.assert_allclose(recipe.channel_stats(floats, chunk=1)[0], mean, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(recipe.channel_stats(floats, chunk=3)), np.asarray((mean, std)), rtol=1e-6)
    out = recipe.normalize(x, mean, std).numpy()
    np.testing.assert_allclose(out, recipe.normalize(floats, mean, std).numpy(), atol=1e-6)
    np.testing.assert_allclose(out.reshape(-1, 2).mean(axis=0), [0, 0], atol=1e-6)
    np.testing.assert_allclose(out.reshape(-1, 2).std(axis=0), [1, 1], atol=1e-5)
    assert out[0, 0, 0, 1] == pytest.approx((10 / 255 - c1.mean()) / c1.std(), rel=1e-5)
