"""PriSM and its peers as choices of a selection rule (+ server model), so the federated process is written once.

PRISM.md §6. Every method returns, per client and round, a `prism_tf.Selection`; the process, traffic accounting and
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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

import prism_tf
from prism_tf.plan import SubmodelPlan
from prism_tf.sampling import (
    Selection,
    channel_subset,
    num_kept,
    output_channels,
    sample_from_singular_values,
)

METHODS = ("prism", "fedavg", "small", "heterofl", "fjord", "fed_dropout", "fedhm")


@dataclasses.dataclass(frozen=True)
class Method:
    """A federated method: whether the server model is factorized, and each client's selection.

    Attributes:
      name: one of `METHODS`.
      keep_ratio: the sub-model's share of kernels (spectral methods) or channels (width methods).
      strategy: sampling strategy for spectral methods (`prism_tf.STRATEGIES`).
      gamma: PriSM's exponent (default by keep ratio).
      output_keep: PriSM's memory-efficient variant: share of owned output channels kept (``None``: all).
      output_rule: ``random`` or ``first`` for ``output_keep``.
      fjord_widths: FjORD's width grid, as fractions of ``keep_ratio``.
      keep_mix: heterogeneous devices: ``((ratio, share), ...)``; each client draws its keep ratio with these
        probabilities every round (e.g. ``((0.2, 0.6), (0.4, 0.4))``, the NeurIPS'24 mix). ``None``: all clients
        use ``keep_ratio``.
    """

    name: str
    keep_ratio: float = 0.2
    strategy: str = "prism"
    gamma: float | None = None
    output_keep: float | None = None
    output_rule: str = "random"
    fjord_widths: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    keep_mix: tuple[tuple[float, float], ...] | None = None

    def __post_init__(self) -> None:
        if self.keep_mix is not None:
            for ratio, share in self.keep_mix:
                prism_tf.sampling.check_keep_ratio(ratio, "keep_mix ratio")
                if not share > 0:
                    raise ValueError(f"keep_mix shares must be positive, got {share}")
        if self.name not in METHODS:
            raise ValueError(f"unknown method {self.name!r}; choose one of {', '.join(METHODS)}")
        prism_tf.sampling.check_keep_ratio(self.keep_ratio)
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
        return self.name in ("heterofl", "fjord", "fed_dropout")

    def sizes(self, plan: SubmodelPlan, keep_ratio: float | None = None) -> dict[str, int]:
        """Sub-model size of every sliced group at ``keep_ratio`` (default the method's)."""
        keep = self.keep_ratio if keep_ratio is None else keep_ratio
        sizes = {}
        if self.spectral:
            sizes.update({g: num_kept(keep, plan.groups[g].size) for g in plan.kernel_groups()})
            if self.output_keep is not None:
                sizes.update({g: num_kept(self.output_keep, plan.groups[g].size)
                              for g in plan.owned_channel_groups().values()})
        elif self.width:
            sizes.update({g: num_kept(keep, plan.groups[g].size) for g in plan.free_channel_groups()})
        return sizes

    def client_keep_ratio(self, rng: np.random.Generator) -> float:
        """The keep ratio of one client this round (FjORD draws a width; the others use `keep_ratio`)."""
        if self.name == "fjord":
            return float(self.keep_ratio * rng.choice(self.fjord_widths))
        if self.keep_mix:
            ratios, shares = zip(*self.keep_mix, strict=True)
            return float(rng.choice(ratios, p=np.asarray(shares) / sum(shares)))
        return self.keep_ratio

    def select(
        self,
        plan: SubmodelPlan,
        singular_values: Mapping[str, np.ndarray],
        seed: tuple[int, ...],
        *,
        keep_ratio: float | None = None,
        clients_per_round: int | None = None,
    ) -> Selection:
        """One client's selection for one round, reproducible from ``seed`` (e.g. ``(run_seed, round, client)``)."""
        keep = self.keep_ratio if keep_ratio is None else keep_ratio
        rng = np.random.default_rng(np.random.SeedSequence(list(seed)).spawn(2)[1])
        if self.spectral:
            selection = sample_from_singular_values(
                singular_values, keep, seed, self.strategy, gamma=self.gamma, clients_per_round=clients_per_round)
            if self.output_keep is None:
                return selection
            channels = output_channels(plan, self.output_keep, self.output_rule, rng)
            return dataclasses.replace(selection, channels=channels)
        if self.width:
            rule = "random" if self.name == "fed_dropout" else "first"
            channels = {g: channel_subset(plan.groups[g].size, keep, rule, rng) for g in plan.free_channel_groups()}
            return Selection({}, keep, self.name, channels=channels)
        return Selection({}, 1.0, self.name)
