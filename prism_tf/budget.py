"""Equal-cost baselines: sub-model sizes, their cost, and the width that costs what a PriSM sub-model costs.

README, "Benchmarks": every method is compared at equal client cost. A width method's ``--keep-ratio`` used as a
channel fraction is not that: slicing a fraction ``f`` of every free channel group costs about ``f²`` of the flops
(ResNet-18 width 16 at ``f = 0.2``: 0.052x), while a PriSM sub-model at keep 0.2 costs 0.265x (README, "Use it from
Python"; a rank-``k`` layer costs ``k·(kh·kw·Cin + Cout)`` per pixel, `prism_tf.cost`). `match_width_fraction` finds
the channel fraction whose sub-model costs what the PriSM sub-model costs; `match_small_width` the width of a plain
model that does.

Costs are `prism_tf.cost` of the real sub-model architecture (`prism_tf.submodel.submodel_architecture`), never a
formula.
Both matchers assume the cost is non-decreasing in the fraction (width) and bisect over the candidates, so they
build about ``log2(candidates) + 2`` models.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import tensorflow as tf

from prism_tf.costs import cost
from prism_tf.plan import SubmodelPlan
from prism_tf.sampling import check_keep_ratio, num_kept
from prism_tf.submodel import submodel_architecture

METRICS = ("flops", "activation_bytes", "params")


def spectral_sizes(
    plan: SubmodelPlan, keep_ratio: float, output_keep: float | None = None, *, multiple_of: int = 1
) -> dict[str, int]:
    """A PriSM sub-model's group sizes: ``ceil(keep·r)`` kernels per principal layer (Niu et al. 2023) and, with
    ``output_keep`` (the memory-efficient variant), ``ceil(output_keep·C)`` channels per owned output group.

    ``multiple_of``: round each kernel count up to a multiple of this (capped at the layer's rank ``r``), sizes
    that CPU kernels may vectorize better; `submodel_cost` of the result shows what the extra kernels cost.
    bench/speed.py times it against the exact ``ceil`` (``prism_k0.2_align8``, bench/results/speed/README.md);
    training and sampling use the exact ``ceil`` (``multiple_of=1``).
    """
    if int(multiple_of) < 1:
        raise ValueError(f"spectral_sizes: multiple_of must be >= 1, got {multiple_of}")
    sizes = {g: _round_up(num_kept(keep_ratio, plan.groups[g].size), int(multiple_of), plan.groups[g].size)
             for g in plan.kernel_groups()}
    if output_keep is not None:
        sizes.update({g: num_kept(output_keep, plan.groups[g].size) for g in plan.owned_channel_groups().values()})
    return sizes


def _round_up(count: int, multiple: int, cap: int) -> int:
    return min(cap, -(-count // multiple) * multiple)


def width_sizes(plan: SubmodelPlan, fraction: float) -> dict[str, int]:
    """A width-sliced sub-model's group sizes: ``ceil(fraction·C)`` channels of every free channel group
    (HeteroFL, FjORD, Federated Dropout, FedRolex; README, "Command line")."""
    check_keep_ratio(fraction, "width fraction")
    return {g: num_kept(fraction, plan.groups[g].size) for g in plan.free_channel_groups()}


def submodel_cost(model: tf.keras.Model, plan: SubmodelPlan, sizes: Mapping[str, int]) -> dict:
    """`prism_tf.cost` of ``model``'s sub-model with these group sizes (groups not named stay full)."""
    return cost(submodel_architecture(model, plan, plan.sizes_with(sizes)))


def cost_ratios(sub: Mapping[str, float], full: Mapping[str, float]) -> dict[str, float]:
    """``{metric: sub[metric] / full[metric]}`` for every metric of `METRICS`."""
    return {m: float(sub[m]) / float(full[m]) for m in METRICS}


def width_fractions(plan: SubmodelPlan) -> list[float]:
    """Every channel fraction at which some free group's size changes: ``j/C`` for ``j = 1..C`` of each group.

    A fraction in ``((j−1)/C, j/C]`` keeps ``j`` of ``C`` channels, so these right ends are all the distinct
    width-sliced sub-models (one per fraction, ascending).
    """
    sizes = {plan.groups[g].size for g in plan.free_channel_groups()}
    if not sizes:
        raise ValueError("width_fractions: the model has no free channel group to slice")
    return sorted({j / c for c in sizes for j in range(1, c + 1)})


def match_width_fraction(
    model: tf.keras.Model, plan: SubmodelPlan, target: float, metric: str = "flops"
) -> tuple[float, dict]:
    """The channel fraction whose width-sliced sub-model of ``model`` (unfactorized) has ``metric`` closest to
    ``target``, and that sub-model's cost.

    Searches every distinct fraction (`width_fractions`) by bisection on the non-decreasing cost and returns the
    closer of the two neighbours of ``target`` (the cheaper one on a tie).
    """
    candidates = width_fractions(plan)
    return _closest(candidates, lambda f: submodel_cost(model, plan, width_sizes(plan, f)), target, metric)


def match_small_width(
    build_model: Callable[[int], tf.keras.Model], target: float, max_width: int, metric: str = "flops"
) -> tuple[int, dict]:
    """The width ``w`` in ``1..max_width`` whose full model ``build_model(w)`` has ``metric`` closest to
    ``target`` (the ``small`` baseline: a model as cheap as the sub-models), and that model's cost."""
    if max_width < 1:
        raise ValueError(f"match_small_width: max_width must be >= 1, got {max_width}")
    return _closest(list(range(1, max_width + 1)), lambda w: cost(build_model(w)), target, metric)


def _closest(candidates: Sequence, cost_of: Callable[[object], dict], target: float, metric: str):
    """Of ascending ``candidates`` with non-decreasing ``cost_of(c)[metric]``, the one closest to ``target``."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    seen: dict[int, dict] = {}

    def at(i: int) -> dict:
        if i not in seen:
            seen[i] = cost_of(candidates[i])
        return seen[i]

    lo, hi = 0, len(candidates) - 1  # first index whose cost reaches the target (or the last one)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if at(mid)[metric] < target else (lo, mid)
    best = min((i for i in (lo - 1, lo) if i >= 0), key=lambda i: (abs(at(i)[metric] - target), i))
    return candidates[best], at(best)


__all__ = ["METRICS", "cost_ratios", "match_small_width", "match_width_fraction", "spectral_sizes",
           "submodel_cost", "width_fractions", "width_sizes"]
