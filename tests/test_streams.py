"""Named random streams: one independent, reproducible generator per random choice (prism_tf.streams)."""

import itertools

import numpy as np
import pytest

from prism_tf import streams

SEED = (7, 3, 11)  # (run seed, round, client)
NAMES = [("kernels", "conv1"), ("kernels", "conv2"), ("channels",), ("channels", "conv1:out"), ("capacity",),
         ("fjord_width",), (3,), ("3",)]


def _uniforms(seed, *names, n=1000):
    return streams.rng(seed, *names).random(n)


def test_same_names_reproduce():
    for names in NAMES:
        np.testing.assert_array_equal(_uniforms(SEED, *names), _uniforms(SEED, *names))
    np.testing.assert_array_equal(_uniforms(np.random.SeedSequence(list(SEED)), "kernels", "a"),
                                  _uniforms(SEED, "kernels", "a"))


def test_different_names_and_seeds_are_distinct_and_uncorrelated():
    draws = {names: _uniforms(SEED, *names) for names in NAMES}
    draws[("other seed",)] = _uniforms((7, 3, 12), "kernels", "conv1")
    for (a, x), (b, y) in itertools.combinations(draws.items(), 2):
        assert not np.array_equal(x, y), (a, b)
        assert abs(np.corrcoef(x, y)[0, 1]) < 0.1, (a, b)  # 1000 iid pairs: |r| has sd 0.032


def test_names_compose_like_paths():
    inner = streams.seed_sequence(SEED, "kernels")
    np.testing.assert_array_equal(streams.rng(inner, "conv1").random(5), _uniforms(SEED, "kernels", "conv1", n=5))
    assert streams.seed_sequence(SEED, "kernels", "conv1").spawn_key == (
        streams.name_key("kernels"), streams.name_key("conv1"))
    assert all(streams.name_key(n) >> 63 == 1 for n in ("a", "", 0, 2**70))


def test_no_stream_is_a_positional_spawn_child():
    # The old code drew layer i's kernels from SeedSequence(seed).spawn(n)[i] and the output channels from
    # spawn(2)[1]: the same generator as layer 1's. Positional children have spawn keys (i,); named ones do not.
    old_channels = np.random.default_rng(np.random.SeedSequence(list(SEED)).spawn(2)[1]).random(1000)
    old_layer1 = np.random.default_rng(np.random.SeedSequence(list(SEED)).spawn(20)[1]).random(1000)
    np.testing.assert_array_equal(old_channels, old_layer1)  # the collision this module removes
    children = [np.random.default_rng(c).random(1000) for c in np.random.SeedSequence(list(SEED)).spawn(20)]
    for names in NAMES:
        assert not any(np.array_equal(_uniforms(SEED, *names), c) for c in children)
    assert not np.array_equal(_uniforms(SEED, "channels"), _uniforms(SEED, "kernels", "conv1"))


@pytest.mark.parametrize("bad", [1.5, True, None, ("a",)])
def test_names_are_str_or_int(bad):
    with pytest.raises(TypeError, match="stream names"):
        streams.rng(SEED, bad)
