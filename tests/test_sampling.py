"""Sampling laws, checked statistically over thousands of draws (docs/algorithm.md §2)."""

import numpy as np
import pytest

import prism_tf
from prism_tf import sampling, streams

RANK = 24
S = np.sort(np.random.default_rng(0).gamma(2.0, 1.0, RANK))[::-1] + 0.05


def _frequencies(strategy, k, draws=4000, **kwargs):
    rng = np.random.default_rng(1)
    counts = np.zeros(RANK)
    for _ in range(draws):
        idx, _ = sampling.draw(S, k, strategy, rng, **kwargs)
        assert len(idx) == k and len(set(idx.tolist())) == k and np.all(np.diff(idx) > 0)
        counts[idx] += 1
    return counts / draws


def test_num_kept_matches_paper_ranks():
    assert [sampling.num_kept(0.2, r) for r in (64, 128, 256, 512)] == [13, 26, 52, 103]
    assert sampling.num_kept(0.3, 10) == 3 and sampling.num_kept(0.01, 16) == 1 and sampling.num_kept(1.0, 7) == 7


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.01, float("nan"), "0.2"])
def test_keep_ratio_validated(bad):
    with pytest.raises(ValueError, match="keep_ratio must be in"):
        sampling.num_kept(bad, 10)


def test_prism_inclusion_rises_with_singular_value_and_matches_sequential_law():
    freq = _frequencies("prism", 5, gamma=2.0)
    # monotone in s up to sampling noise: compare quartiles of the spectrum
    q = np.array_split(freq, 4)
    assert q[0].mean() > q[1].mean() > q[2].mean() > q[3].mean()
    assert freq.min() > 0  # no kernel is always dropped ...
    assert freq.max() < 1  # ... and none is always kept
    # the exact law: numpy's sequential draw without replacement with p ∝ s^γ, simulated independently
    p = S**2.0 / np.sum(S**2.0)
    rng = np.random.default_rng(2)
    ref = np.zeros(RANK)
    for _ in range(4000):
        ref[rng.choice(RANK, 5, replace=False, p=p)] += 1
    np.testing.assert_allclose(freq, ref / 4000, atol=0.04)


def test_prism_default_gamma():
    assert sampling.default_gamma(0.2) == 4.0 and sampling.default_gamma(0.21) == 2.5


def test_top_is_deterministic_and_uniform_is_flat():
    idx, w = sampling.draw(S, 4, "top", np.random.default_rng(0))
    np.testing.assert_array_equal(idx, [0, 1, 2, 3])
    np.testing.assert_array_equal(w, np.ones(4))
    freq = _frequencies("uniform", 6)
    np.testing.assert_allclose(freq, 6 / RANK, atol=0.035)


@pytest.mark.parametrize("strategy", ["unbiased", "collective"])
def test_design_marginals_are_the_target_inclusion_probabilities(strategy):
    k, clients = 6, 8
    target = (sampling.unbiased_inclusion(S, k) if strategy == "unbiased"
              else sampling.collective_inclusion(S, k, clients))
    assert target.sum() == pytest.approx(k, abs=1e-9)
    assert np.all(np.diff(target) <= 1e-12)  # non-increasing in s
    # exact marginals of the fitted conditional-Poisson design
    free = (target > 1e-12) & (target < 1 - 1e-12)
    m = int(round(target[free].sum()))
    theta = np.array(sampling.conditional_poisson_odds(tuple(target[free].round(12)), m))
    np.testing.assert_allclose(sampling.conditional_poisson_inclusion(theta, m), target[free], atol=1e-8)
    # and the draws follow them
    freq = _frequencies(strategy, k, draws=5000, clients_per_round=clients)
    sigma = np.sqrt(target * (1 - target) / 5000)
    assert np.all(np.abs(freq - target) <= 4.5 * sigma + 1e-9)


def test_unbiased_estimator_is_unbiased():
    rng = np.random.default_rng(3)
    u, _ = np.linalg.qr(rng.normal(size=(12, 8)))
    v, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    s = np.array([5.0, 3.0, 2.0, 1.5, 1.0, 0.6, 0.3, 0.1])
    w = (u * s) @ v.T
    draws, total = 6000, np.zeros_like(w)
    samples = []
    for _ in range(draws):
        idx, omega = sampling.draw(s, 3, "unbiased", rng)
        est = (u[:, idx] * (omega * s[idx])) @ v[:, idx].T
        total += est
        samples.append(est)
    mean = total / draws
    stderr = np.std(np.stack(samples), axis=0) / np.sqrt(draws)
    assert np.all(np.abs(mean - w) <= 4.5 * stderr + 1e-9)
    # a biased strategy is detectably off: top-k misses the tail entirely
    idx, _ = sampling.draw(s, 3, "top", rng)
    assert np.abs((u[:, idx] * s[idx]) @ v[:, idx].T - w).max() > 0.1


def test_collective_limits():
    k = 5
    top = sampling.collective_inclusion(S, k, 1)
    np.testing.assert_array_equal(top, np.r_[np.ones(k), np.zeros(RANK - k)])
    many = sampling.collective_inclusion(S, k, 100000)
    np.testing.assert_allclose(many, sampling.unbiased_inclusion(S, k), atol=2e-3)
    idx, omega = sampling.draw(S, k, "collective", np.random.default_rng(0), clients_per_round=10)
    assert np.all((omega >= 1) & (omega <= 10))
    with pytest.raises(ValueError, match="clients_per_round"):
        sampling.draw(S, k, "collective", np.random.default_rng(0))


def test_sample_model_seeded_independent_layers_and_expected_size():
    fm = prism_tf.factorize(prism_tf.models.resnet18(width=8))
    a = prism_tf.sample(fm, 0.25, seed=(7, 0, 1))
    b = prism_tf.sample(fm, 0.25, seed=(7, 0, 1))
    c = prism_tf.sample(fm, 0.25, seed=(7, 0, 2))
    assert all(np.array_equal(a.layers[n].indices, b.layers[n].indices) for n in a.layers)
    assert any(not np.array_equal(a.layers[n].indices, c.layers[n].indices) for n in a.layers)
    for layer_sel in a.layers.values():
        assert layer_sel.size == sampling.num_kept(0.25, layer_sel.rank)
    # heterogeneous keep ratios per client
    assert prism_tf.sample(fm, 0.5, seed=1).sizes()["stage4_block2_2_conv"] == 32
    assert prism_tf.sample(fm, 0.1, seed=1).sizes()["stage4_block2_2_conv"] == 7
    with pytest.raises(ValueError, match="unknown strategy"):
        prism_tf.sample(fm, 0.2, strategy="best")
    with pytest.raises(ValueError, match="factorize first"):
        prism_tf.sample(prism_tf.models.small_cnn(width=4), 0.2)


def test_many_clients_cover_nearly_every_kernel():
    fm = prism_tf.factorize(prism_tf.models.resnet18(width=8))
    sels = [prism_tf.sample(fm, 0.2, seed=(0, 0, c), strategy="uniform") for c in range(20)]
    assert prism_tf.kernel_coverage(fm, sels) > 0.95
    tops = [prism_tf.sample(fm, 0.2, seed=(0, 0, c), strategy="top") for c in range(20)]
    assert prism_tf.kernel_coverage(fm, tops) == pytest.approx(0.25, abs=0.06)


def test_each_layer_draws_from_its_named_stream():
    spectra = {"a": S, "b": S[:16] * 2.0, "c": S[:8] + 1.0}
    sel = sampling.sample_from_singular_values(spectra, 0.25, (5, 2, 9), "prism")
    for name, s in spectra.items():
        idx, scale = sampling.draw(s, sampling.num_kept(0.25, len(s)), "prism",
                                   streams.rng((5, 2, 9), "kernels", name), gamma=sampling.default_gamma(0.25))
        np.testing.assert_array_equal(sel.layers[name].indices, idx)
        np.testing.assert_array_equal(sel.layers[name].scale, scale)
    # adding a layer, dropping one or reordering leaves every other layer's draw unchanged
    more = sampling.sample_from_singular_values({"new": S, "c": spectra["c"], "a": S}, 0.25, (5, 2, 9), "prism")
    for name in ("a", "c"):
        np.testing.assert_array_equal(more.layers[name].indices, sel.layers[name].indices)


def test_output_keep_channels_are_per_group_streams_and_differ_from_kernels():
    fm = prism_tf.factorize(prism_tf.models.resnet18(width=8))
    plan = prism_tf.SubmodelPlan.of(fm)
    sel = prism_tf.sample(fm, 0.25, seed=(1, 0, 4), output_keep=0.5)
    plain = prism_tf.sample(fm, 0.25, seed=(1, 0, 4))
    assert all(np.array_equal(sel.layers[n].indices, plain.layers[n].indices) for n in sel.layers)
    assert set(sel.channels) == set(plan.owned_channel_groups().values())
    for group, idx in sel.channels.items():
        size = plan.groups[group].size
        expected = np.sort(streams.rng((1, 0, 4), "channels", group).choice(size, size // 2, replace=False))
        np.testing.assert_array_equal(idx, expected)
    with pytest.raises(ValueError, match="needs the model's plan"):
        sampling.sample_from_singular_values({"a": S}, 0.5, 0, output_keep=0.5)


def test_rolling_window_rolls_by_one_and_covers_every_channel_equally():
    np.testing.assert_array_equal(sampling.rolling_window(10, 0.3, 0), [0, 1, 2])
    np.testing.assert_array_equal(sampling.rolling_window(10, 0.3, 1), [1, 2, 3])
    np.testing.assert_array_equal(sampling.rolling_window(10, 0.3, 9), [0, 1, 9])  # wraps around
    np.testing.assert_array_equal(sampling.rolling_window(10, 0.3, 10), [0, 1, 2])  # round C = round 0
    counts = np.zeros(10, int)
    for t in range(10):
        counts[sampling.rolling_window(10, 0.3, t)] += 1
    np.testing.assert_array_equal(counts, np.full(10, 3))  # each channel kept ceil(0.3·10) = 3 times in C rounds
    assert len(sampling.rolling_window(7, 0.5, 123)) == 4
