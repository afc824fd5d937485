"""Equal-cost baselines: sub-model sizes, their cost, and the matched width (prism_tf.budget)."""

import numpy as np
import pytest

import prism_tf
from prism_tf import budget


def _prism_target(width: int, keep: float = 0.2) -> tuple[dict, dict]:
    plain = prism_tf.models.resnet18(width=width)
    fm = prism_tf.factorize(plain)
    plan = prism_tf.SubmodelPlan.of(fm)
    return budget.submodel_cost(fm, plan, budget.spectral_sizes(plan, keep)), prism_tf.cost(plain)


def test_sizes_follow_ceil_rule():
    plain = prism_tf.models.resnet18(width=8)
    plan = prism_tf.SubmodelPlan.of(plain)
    sizes = budget.width_sizes(plan, 0.3)
    assert set(sizes) == set(plan.free_channel_groups())
    assert all(sizes[g] == int(np.ceil(0.3 * plan.groups[g].size)) for g in sizes)  # 8->3, 16->5, 32->10, 64->20
    assert {plan.groups[g].size: n for g, n in sizes.items()} == {8: 3, 16: 5, 32: 10, 64: 20}
    fm = prism_tf.factorize(plain)
    fplan = prism_tf.SubmodelPlan.of(fm)
    spectral = budget.spectral_sizes(fplan, 0.2, output_keep=0.5)
    assert all(spectral[g] == int(np.ceil(0.2 * fplan.groups[g].size)) for g in fplan.kernel_groups())
    assert all(spectral[g] == fplan.groups[g].size // 2 for g in fplan.owned_channel_groups().values())


def test_submodel_cost_is_the_cost_of_the_extracted_model():
    plain = prism_tf.models.resnet18(width=8)
    plan = prism_tf.SubmodelPlan.of(plain)
    channels = {g: np.arange(plan.groups[g].size // 2, dtype=np.int32) for g in plan.free_channel_groups()}
    sub = prism_tf.extract(plain, prism_tf.Selection({}, 0.5, "heterofl", channels=channels))
    got = budget.submodel_cost(plain, plan, budget.width_sizes(plan, 0.5))
    want = prism_tf.cost(sub)
    assert {k: got[k] for k in budget.METRICS} == {k: want[k] for k in budget.METRICS}
    assert budget.cost_ratios(got, prism_tf.cost(plain))["params"] == pytest.approx(want["params"] / sum(
        int(np.prod(w.shape)) for w in plain.weights))


def test_width_fractions_are_every_distinct_slice():
    plan = prism_tf.SubmodelPlan.of(prism_tf.models.resnet18(width=16))  # free groups of 16, 32, 64, 128
    fractions = budget.width_fractions(plan)
    np.testing.assert_allclose(fractions, np.arange(1, 129) / 128)
    assert len({tuple(sorted(budget.width_sizes(plan, f).items())) for f in fractions}) == 128


@pytest.mark.slow  # 15-30 s: `make test-all` (the default suite stays under 15 minutes)
def test_match_is_the_brute_force_closest():
    plain = prism_tf.models.resnet18(width=4)  # 32 candidate fractions: cheap to check them all
    plan = prism_tf.SubmodelPlan.of(plain)
    fractions = budget.width_fractions(plan)
    flops = [budget.submodel_cost(plain, plan, budget.width_sizes(plan, f))["flops"] for f in fractions]
    assert flops == sorted(flops)  # non-decreasing: what the bisection relies on
    for target in (flops[3] + 1, (flops[10] + flops[11]) / 2 - 1, 0.5 * flops[0], 2 * flops[-1]):
        fraction, got = budget.match_width_fraction(plain, plan, target)
        best = min(range(len(flops)), key=lambda i: (abs(flops[i] - target), i))
        assert fraction == fractions[best] and got["flops"] == flops[best]
    with pytest.raises(ValueError, match="unknown metric"):
        budget.match_width_fraction(plain, plan, 1.0, metric="latency")


@pytest.mark.parametrize("width", [16, 64])
def test_width_matches_prism_flops_within_5_percent(width):
    target, full = _prism_target(width)
    plain = prism_tf.models.resnet18(width=width)
    plan = prism_tf.SubmodelPlan.of(plain)
    fraction, matched = budget.match_width_fraction(plain, plan, target["flops"])
    assert abs(matched["flops"] / target["flops"] - 1) <= 0.05  # measured: 0.957 at width 16, 0.986 at 64
    assert 0.45 <= fraction <= 0.55  # flops ~ f²: sqrt(0.265) = 0.51
    nominal = budget.submodel_cost(plain, plan, budget.width_sizes(plan, 0.2))
    assert nominal["flops"] / target["flops"] < 0.25  # HeteroFL at nominal 0.2: 0.052x vs PriSM's 0.265x
    assert target["flops"] / full["flops"] == pytest.approx(0.265 if width == 16 else 0.239, abs=0.002)


def test_match_small_width_is_the_closest_width():
    target, _ = _prism_target(16)
    flops = {w: prism_tf.cost(prism_tf.models.resnet18(width=w))["flops"] for w in range(1, 17)}
    width, got = budget.match_small_width(lambda w: prism_tf.models.resnet18(width=w), target["flops"], 16)
    best = min(flops, key=lambda w: (abs(flops[w] - target["flops"]), w))
    assert width == best and got["flops"] == flops[best]
    assert abs(flops[width] - target["flops"]) <= abs(flops[width + 1] - target["flops"])
    with pytest.raises(ValueError, match="max_width"):
        budget.match_small_width(lambda w: prism_tf.models.resnet18(width=w), 1.0, 0)


def test_kernel_counts_rounded_up_to_a_multiple_are_capped_at_the_rank():
    fplan = prism_tf.SubmodelPlan.of(prism_tf.factorize(prism_tf.models.resnet18(width=16)))
    exact = budget.spectral_sizes(fplan, 0.2)
    aligned = budget.spectral_sizes(fplan, 0.2, multiple_of=8)
    ranks = {g: fplan.groups[g].size for g in fplan.kernel_groups()}
    # ranks 16/32/64/128 at keep 0.2: ceil gives 4/7/13/26, rounded up to 8s: 8/8/16/32
    assert {ranks[g]: (exact[g], aligned[g]) for g in ranks} == {16: (4, 8), 32: (7, 8), 64: (13, 16), 128: (26, 32)}
    assert budget.spectral_sizes(fplan, 0.9, multiple_of=64)[min(ranks, key=ranks.get)] == 16  # capped at rank 16
    with pytest.raises(ValueError, match="multiple_of must be >= 1"):
        budget.spectral_sizes(fplan, 0.2, multiple_of=0)
