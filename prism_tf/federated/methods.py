"""PriSM and its peers as choices of a selection rule (+ server model), so the federated process is written once.

docs/algorithm.md §4. Every method returns, per client and round, a `prism_tf.Selection`; the process, traffic
accounting and
aggregation do not change:

| method        | server model       | what a client gets                                              |
|---------------|--------------------|-----------------------------------------------------------------|
| ``prism``     | factorized         | sampled principal kernels (``--strategy``, default ``prism``)   |
| ``fedhm``     | factorized         | the top-k principal kernels (fixed low rank)                    |
| ``fedavg``    | original           | everything (the upper bound)                                    |
| ``small``     | original, narrower | everything of a model as cheap as the sub-models                |
| ``heterofl``  | original           | the first ``ceil(p·C)`` channels of every free channel group    |
| ``fed_dropout``| original          | random ``ceil(p·C)`` channels of every free channel group       |
| ``fjord``     | original           | ordered dropout: the first channels at a width drawn per client |
| ``fedrolex``  | original           | a window of ``ceil(p·C)`` channels rolling by one per round     |

Width methods slice channel fraction ``p`` = `Method.width_fraction` (``None``: the nominal ``keep_ratio``);
`equal_cost_method` sets it so that a client's sub-model costs what PriSM's does (README, "Benchmarks").

Randomness (`prism_tf.streams`): kernels and channels of client ``c`` in round ``t`` come from the named streams
of ``(seed, t, c)``; a device's capacity (``keep_mix``) from ``((seed, c), "capacity")``, fixed for the run;
FjORD's per-round width from ``((seed, t, c), "fjord_width")``.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf

import prism_tf
from prism_tf import budget, streams
from prism_tf.plan import SubmodelPlan
from prism_tf.sampling import Selection, channel_selection, rolling_window, sample_from_singular_values

METHODS = ("prism", "fedavg", "small", "heterofl", "fjord", "fed_dropout", "fedhm", "fedrolex")
WIDTH_METHODS = ("heterofl", "fjord", "fed_dropout", "fedrolex")


@dataclasses.dataclass(frozen=True)
class Method:
    """A federated method: whether the server model is factorized, and each client's selection.

    Attributes:
      name: one of `METHODS`.
      keep_ratio: the sub-model's share of kernels (spectral methods); for width methods, the channel fraction
        unless ``width_fraction`` is given.
      strategy: sampling strategy for spectral methods (`prism_tf.STRATEGIES`).
      gamma: PriSM's exponent (default by keep ratio).
      output_keep: PriSM's memory-efficient variant: share of owned output channels kept (``None``: all).
      output_rule: ``random`` or ``first`` for ``output_keep``.
      fjord_widths: FjORD's width grid, as fractions of the method's channel fraction (the largest width of the
        grid, 1.0 by default, is ``width_fraction``).
      keep_mix: heterogeneous devices: ``((ratio, share), ...)``, e.g. ``((0.2, 0.6), (0.4, 0.4))`` (the NeurIPS'24
        mix). A device's ratio is fixed for the run (`capacity`). ``None``: all clients use ``keep_ratio``.
      width_fraction: the channel fraction of width methods (``heterofl``, ``fjord``, ``fed_dropout``,
        ``fedrolex``) for a client of capacity ``keep_ratio``; ``None`` uses ``keep_ratio`` itself (nominal).
        `equal_cost_method` sets it to match PriSM's cost.
    """

    name: str
    keep_ratio: float = 0.2
    strategy: str = "prism"
    gamma: float | None = None
    output_keep: float | None = None
    output_rule: str = "random"
    fjord_widths: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    keep_mix: tuple[tuple[float, float], ...] | None = None
    width_fraction: float | None = None

    def __post_init__(self) -> None:
        if self.keep_mix is not None:
            for ratio, share in self.keep_mix:
                prism_tf.sampling.check_keep_ratio(ratio, "keep_mix ratio")
                if not share > 0:
                    raise ValueError(f"keep_mix shares must be positive, got {share}")
        if self.name not in METHODS:
            raise ValueError(f"unknown method {self.name!r}; choose one of {', '.join(METHODS)}")
        prism_tf.sampling.check_keep_ratio(self.keep_ratio)
        if self.width_fraction is not None:
            prism_tf.sampling.check_keep_ratio(self.width_fraction, "width_fraction")
        if self.name == "fedhm":
            object.__setattr__(self, "strategy", "top")
        if self.spectral and self.strategy not in prism_tf.STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(prism_tf.STRATEGIES)}")

    @property
    def spectral(self) -> bool:
        """Whether the server model is factorized into principal kernels."""
        return self.name in ("prism", "fedhm")

    @property
    def width(self) -> bool:
        """Whether clients train width slices (channel subsets) of the unfactorized server model."""
        return self.name in WIDTH_METHODS

    def channel_fraction(self, keep_ratio: float | None = None) -> float:
        """A width method's channel fraction for a client of capacity ``keep_ratio`` (default the method's).

        Nominal (``width_fraction=None``): the capacity itself. Otherwise ``width_fraction · keep_ratio /
        self.keep_ratio`` (capped at 1): exactly ``width_fraction`` at the method's keep ratio, FjORD's grid widths
        multiply it.
        """
        keep = self.keep_ratio if keep_ratio is None else keep_ratio
        if self.width_fraction is None:
            return float(keep)
        return float(min(1.0, self.width_fraction * keep / self.keep_ratio))

    def sizes(self, plan: SubmodelPlan, keep_ratio: float | None = None) -> dict[str, int]:
        """Sub-model size of every sliced group at ``keep_ratio`` (default the method's)."""
        keep = self.keep_ratio if keep_ratio is None else keep_ratio
        if self.spectral:
            return budget.spectral_sizes(plan, keep, self.output_keep)
        if self.width:
            return budget.width_sizes(plan, self.channel_fraction(keep))
        return {}

    def capacity(self, seed: int, client_id: int) -> float:
        """Client ``client_id``'s keep ratio for the whole run: a function of ``(seed, client_id)`` only.

        With ``keep_mix``, each device draws its ratio once, independently, with probabilities ∝ the shares, from
        the stream ``((seed, client_id), "capacity")``: over ``N`` devices the count of a share ``q`` is
        Binomial(N, q) (shares honored in expectation, not exactly). Without: ``keep_ratio``.
        """
        if not self.keep_mix:
            return self.keep_ratio
        ratios, shares = zip(*self.keep_mix, strict=True)
        cumulative = np.cumsum(shares) / float(sum(shares))
        u = streams.rng((int(seed), int(client_id)), streams.CAPACITY).random()
        return float(ratios[min(int(np.searchsorted(cumulative, u, side="right")), len(ratios) - 1)])

    def client_keep_ratio(self, seed: int, client_id: int, round_num: int = 0) -> float:
        """The keep ratio client ``client_id`` trains at in round ``round_num``: its `capacity`; for FjORD times a
        width drawn from ``fjord_widths`` every round from the stream ``((seed, round, client), "fjord_width")``
        (ordered dropout)."""
        keep = self.capacity(seed, client_id)
        if self.name == "fjord":
            grid = streams.rng((int(seed), int(round_num), int(client_id)), streams.FJORD_WIDTH)
            keep *= float(grid.choice(self.fjord_widths))
        return float(keep)

    def select(
        self,
        plan: SubmodelPlan,
        singular_values: Mapping[str, np.ndarray],
        seed: tuple[int, ...],
        *,
        keep_ratio: float | None = None,
        clients_per_round: int | None = None,
        round_num: int | None = None,
    ) -> Selection:
        """One client's selection for one round, reproducible from ``seed`` (e.g. ``(run_seed, round, client)``).

        Spectral methods: `prism_tf.sampling.sample_from_singular_values`, the code path of `prism_tf.sample`, so
        both give the identical selection for the same seed. ``round_num`` is needed by ``fedrolex`` (its window
        starts at ``round_num mod C``, `prism_tf.sampling.rolling_window`).
        """
        keep = self.keep_ratio if keep_ratio is None else keep_ratio
        if self.spectral:
            return sample_from_singular_values(
                singular_values, keep, seed, self.strategy, gamma=self.gamma, clients_per_round=clients_per_round,
                plan=plan, output_keep=self.output_keep, output_rule=self.output_rule)
        if not self.width:
            return Selection({}, 1.0, self.name)
        fraction = self.channel_fraction(keep)
        groups = plan.free_channel_groups()
        if self.name == "fedrolex":
            if round_num is None:
                raise ValueError("fedrolex: select needs round_num (its window rolls with the round)")
            channels = {g: rolling_window(plan.groups[g].size, fraction, round_num) for g in groups}
        else:
            rule = "random" if self.name == "fed_dropout" else "first"
            channels = channel_selection(plan, groups, fraction, rule, seed)
        return Selection({}, fraction, self.name, channels=channels)


def equal_cost_method(
    method: Method,
    server_model: tf.keras.Model,
    metric: str = "flops",
    *,
    factorize_options: dict | None = None,
    build_model: Callable[[int], tf.keras.Model] | None = None,
    max_width: int | None = None,
) -> tuple[Method, dict]:
    """``method`` at PriSM's client cost, and a description of that budget (README, "Benchmarks").

    The target is the PriSM sub-model of ``server_model`` (the full, unfactorized model) at ``method.keep_ratio``
    and ``method.output_keep``. A width method gets the ``width_fraction`` whose sub-model's ``metric`` is closest
    to the target (`prism_tf.budget.match_width_fraction`; for FjORD, its widest grid width); other methods are
    returned unchanged. ``small`` needs ``build_model(width)`` and ``max_width``: the budget then names the width
    whose model is closest to the target (``small_width``, `prism_tf.budget.match_small_width`).

    The budget (JSON-ready): ``metric``, ``keep_ratio``, ``output_keep``, ``target`` (PriSM's ``metric``),
    ``width_fraction`` (``None`` unless matched), ``{flops,params,activation_bytes}_ratio`` of the method's
    (widest) client model and ``prism_{flops,params,activation_bytes}_ratio`` of PriSM's, relative to the full
    model.
    """
    if metric not in budget.METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(budget.METRICS)}")
    if method.width and method.keep_mix:
        raise ValueError("equal_cost_method: a keep_mix has one budget per ratio; match width methods at one ratio")
    if method.name == "small" and (build_model is None or max_width is None):
        raise ValueError("equal_cost_method: 'small' needs build_model(width) and max_width")
    full = prism_tf.cost(server_model)
    fm = prism_tf.factorize(server_model, **(factorize_options or {}))
    fm_plan = SubmodelPlan.of(fm)
    target = budget.submodel_cost(fm, fm_plan, budget.spectral_sizes(fm_plan, method.keep_ratio, method.output_keep))
    matched = target
    if method.width:
        plan = SubmodelPlan.of(server_model)
        fraction, matched = budget.match_width_fraction(server_model, plan, target[metric], metric)
        widest = max(method.fjord_widths) if method.name == "fjord" else 1.0
        method = dataclasses.replace(method, width_fraction=min(1.0, fraction / widest))
    elif method.name == "fedavg":
        matched = full
    info = {"metric": metric, "keep_ratio": method.keep_ratio, "output_keep": method.output_keep,
            "target": float(target[metric]), "width_fraction": method.width_fraction}
    if method.name == "small":
        info["small_width"], matched = budget.match_small_width(build_model, target[metric], max_width, metric)
    info.update({f"{m}_ratio": r for m, r in budget.cost_ratios(matched, full).items()})
    info.update({f"prism_{m}_ratio": r for m, r in budget.cost_ratios(target, full).items()})
    return method, info


def round_selections(
    method: Method,
    plan: SubmodelPlan,
    singular_values: Mapping[str, np.ndarray],
    seed: int,
    round_num: int,
    client_ids: Sequence[int],
    collective_clients: int | None = None,
) -> list[Selection]:
    """Every client's selection for round ``round_num``, one per id of ``client_ids`` (global client ids).

    Client ``c`` selects with seed ``(seed, round, c)`` at its keep ratio `Method.client_keep_ratio` (its fixed
    capacity; FjORD's width of the round). The ``collective`` strategy's ``C`` is the number of this round's clients
    at that client's keep ratio (Korzhenkov & Louizos 2024, Eq. 8: the clients that share a keep ratio), unless
    ``collective_clients`` is set. The process (`tff_pipelines.round.process.PrismProcess.selections`) and round replay
    (`prism_tf.federated.replay`) both call this.
    """
    ids = [int(c) for c in client_ids]
    if any(c < 0 for c in ids):
        raise ValueError(f"selections: client ids must be non-negative integers, got {ids}")
    keeps = [method.client_keep_ratio(seed, c, round_num) for c in ids]
    sharing = collections.Counter(keeps)
    return [method.select(plan, singular_values, (seed, round_num, c), keep_ratio=keep, round_num=round_num,
                          clients_per_round=collective_clients or sharing[keep])
            for c, keep in zip(ids, keeps, strict=True)]


def deployed_models(method: Method, server_model: tf.keras.Model) -> dict[str, tf.keras.Model]:
    """The models a user of ``method`` would deploy (docs/algorithm.md §6), from the trained ``server_model``.

    ``deployed`` is the server model for PriSM, FedHM, FedAvg, ``small``, Federated Dropout and FedRolex; for
    HeteroFL and FjORD it is the widest model their clients trained (the server's other channels are never
    trained), and the full server model is returned beside it as ``server``.
    """
    if method.name not in ("heterofl", "fjord"):
        return {"deployed": server_model}
    widest = max(method.fjord_widths) if method.name == "fjord" else 1.0
    fraction = method.channel_fraction(method.keep_ratio * widest)
    plan = SubmodelPlan.of(server_model)
    channels = {g: np.arange(prism_tf.sampling.num_kept(fraction, plan.groups[g].size), dtype=np.int32)
                for g in plan.free_channel_groups()}
    sub = prism_tf.extract(server_model, Selection({}, fraction, method.name, channels=channels))
    return {"deployed": sub, "server": server_model}
