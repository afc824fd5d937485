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

import math
from collections.abc import Callable, Mapping, Sequence

import tensorflow as tf

from prism_tf.costs import cost
from prism_tf.plan import SubmodelPlan
from prism_tf.sampling import check_keep_ratio, num_kept
from prism_tf.submodel import submodel_architecture

METRICS = ("flops", "activation_bytes", "params")


def spectral_sizes(
    plan: SubmodelPlan, keep_ratio: float, output_keep: float | None = None, *, multiple_of: int = 1,
    kernels: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """A PriSM sub-model's group sizes: ``ceil(keep·r)`` kernels per principal layer (Niu et al. 2023) and, with
    ``output_keep`` (the memory-efficient variant), ``ceil(output_keep·C)`` channels per owned output group.

    ``multiple_of``: round each kernel count up to a multiple of this (capped at the layer's rank ``r``), sizes
    that CPU kernels may vectorize better; `submodel_cost` of the result shows what the extra kernels cost.
    bench/speed.py times it against the exact ``ceil`` (``prism_k0.2_align8``, bench/results/speed/README.md);
    training and sampling use the exact ``ceil`` (``multiple_of=1``).

    ``kernels``: per kernel group, a count that replaces ``ceil(keep·r)`` (a rank allocation, `flops_aware_kernels`).
    """
    if int(multiple_of) < 1:
        raise ValueError(f"spectral_sizes: multiple_of must be >= 1, got {multiple_of}")
    kernels = kernels or {}
    sizes = {g: _round_up(int(kernels[g]) if g in kernels else num_kept(keep_ratio, plan.groups[g].size),
                          int(multiple_of), plan.groups[g].size)
             for g in plan.kernel_groups()}
    if output_keep is not None:
        sizes.update({g: num_kept(output_keep, plan.groups[g].size) for g in plan.owned_channel_groups().values()})
    return sizes


def parse_rank_allocation(text: str) -> float | None:
    """``"uniform"`` -> ``None``; ``"flops"`` -> 1.0; ``"flops:0.5"`` -> 0.5 (the exponent α of
    `flops_aware_kernels`).

    Raises:
      ValueError: anything else, naming ``--rank-allocation``.
    """
    if text == "uniform":
        return None
    name, _, alpha = str(text).partition(":")
    try:
        value = float(alpha) if alpha else 1.0
    except ValueError:
        value = float("nan")
    if name != "flops" or not (0.0 < value <= 4.0):
        raise ValueError(f"--rank-allocation must be uniform, flops or flops:ALPHA with 0 < ALPHA <= 4, got {text!r}")
    return value


def rank_unit_flops(model: tf.keras.Model, plan: SubmodelPlan, sizes: Mapping[str, int]) -> dict[str, float]:
    """Per kernel group, the multiply-adds per example one more principal kernel adds to the sub-model of ``sizes``
    (a rank-``k`` layer's flops are linear in ``k``: ``k·(kh·kw·Cin + Cout)`` per output pixel, `prism_tf.cost`).

    Measured on the real sub-model (`submodel_cost`): every group one kernel larger (smaller where it is at full
    rank), read per layer; a layer with several kernel groups (an LSTM's input and recurrent kernels) is measured
    group by group.
    """
    groups = plan.kernel_groups()
    base = submodel_cost(model, plan, sizes)["layers"]
    step = {g: 1 if sizes[g] < plan.groups[g].size else -1 for g in groups}
    layer_of = {g: g.split("/")[0] for g in groups}
    shared = {name for name in layer_of.values() if sum(1 for v in layer_of.values() if v == name) > 1}
    single = [g for g in groups if layer_of[g] not in shared]
    out: dict[str, float] = {}
    if single:
        bumped = submodel_cost(model, plan, {**sizes, **{g: sizes[g] + step[g] for g in single}})["layers"]
        out.update({g: (bumped.get(g, 0) - base.get(g, 0)) / step[g] for g in single})
    for g in groups:
        if g not in out:
            bumped = submodel_cost(model, plan, {**sizes, g: sizes[g] + step[g]})["layers"]
            out[g] = (bumped.get(layer_of[g], 0) - base.get(layer_of[g], 0)) / step[g]
    return out


def flops_aware_kernels(
    model: tf.keras.Model, plan: SubmodelPlan, keep_ratio: float, output_keep: float | None = None, *,
    alpha: float = 1.0,
) -> dict[str, int]:
    """Kernels per group for the client flops of a uniform ``keep_ratio``, spent where a kernel is cheap
    (docs/algorithm.md §5, "Rank allocation").

    A uniform keep ratio gives layer ``g`` of rank ``r_g`` about ``keep·r_g`` kernels wherever it sits; a kernel of
    a 3×3 layer at 32×32 pixels costs 8x one at 4×4. This allocation gives ``k_g = clip(round(λ·r_g / c_g^α), 1,
    r_g)``, ``c_g`` the flops of one more kernel in layer ``g`` (`rank_unit_flops`), with the largest ``λ`` whose
    sub-model costs no more flops than the uniform one. ``α = 1`` maximizes ``Σ r_g·log k_g`` (every layer's
    kernels, weighted by its rank, with diminishing returns) at that budget; ``α = 0`` is the uniform allocation.

    Rounding down leaves budget over; it is spent one kernel at a time where the objective gains most per flop.
    Returns ``{group: k_g}`` for every kernel group; the sub-model's flops are at most the uniform one's.
    """
    uniform = spectral_sizes(plan, keep_ratio, output_keep)
    unit = rank_unit_flops(model, plan, uniform)
    groups = plan.kernel_groups()
    ranks = {g: plan.groups[g].size for g in groups}
    weight = {g: ranks[g] / max(unit[g], 1e-30) ** alpha for g in groups}
    budget_flops = sum(unit[g] * uniform[g] for g in groups)  # the principal layers' share of the uniform flops

    def kernels(lam: float) -> dict[str, int]:
        return {g: int(min(ranks[g], max(1, round(lam * weight[g])))) for g in groups}

    def spent(k: Mapping[str, int]) -> float:
        return sum(unit[g] * k[g] for g in groups)

    lo, hi = 0.0, max(ranks[g] / weight[g] for g in groups) * 2.0
    for _ in range(100):  # bisect λ: spent() is non-decreasing in λ
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if spent(kernels(mid)) <= budget_flops else (lo, mid)
    best = kernels(lo)
    # Rounding leaves some budget: add one kernel at a time where it gains most of the objective per flop.
    while True:
        room = [g for g in groups if best[g] < ranks[g] and spent(best) + unit[g] <= budget_flops]
        if not room:
            return best
        best[max(room, key=lambda g: ranks[g] * math.log1p(1.0 / best[g]) / max(unit[g], 1e-30) ** alpha)] += 1


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
