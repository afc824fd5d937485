"""Spectral methods: the server model is factorized, a client trains some of each layer's principal kernels.

docs/algorithm.md §2 (the strategies), §4 (peer methods). Both sample with
`prism_tf.sampling.sample_from_singular_values`, the code path of `prism_tf.sample`, so the library and the
federated process give the identical selection for the same seed.

| method  | what a client gets                                            |
|---------|---------------------------------------------------------------|
| `prism` | sampled principal kernels (``strategy``, default ``prism``)   |
| `fedhm` | the top-k principal kernels (fixed low rank, ``strategy=top``) |
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

import prism_tf
from prism_tf import budget
from prism_tf.federated.methods.base import CostBudget, Method, register
from prism_tf.plan import SubmodelPlan
from prism_tf.sampling import Selection, sample_from_singular_values


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpectralMethod(Method):
    """A client trains ``ceil(keep_ratio · r)`` principal kernels of each factorized layer (docs/algorithm.md §2).

    Attributes:
      strategy: sampling strategy (`prism_tf.STRATEGIES`).
      gamma: PriSM's exponent (default by keep ratio).
      output_rule: ``random`` or ``first``: which owned output channels ``output_keep`` keeps.
      warmup_rounds: the first rounds select deterministically, the top-k kernels of every layer (strategy
        ``top``; the authors' ``--warmup-round``), then ``strategy``.
      rank_allocation: ``uniform`` (``ceil(keep·r)`` kernels per layer) or ``flops[:ALPHA]``: the same client flops
        spent where a kernel is cheap (`prism_tf.budget.flops_aware_kernels`); set by `match_cost`.
      kernels: ``((group, k), ...)``: the allocation's kernel count per group (``None``: uniform). `match_cost`
        computes it, the run's budget record keeps it (`with_budget`).
    """

    spectral = True

    strategy: str = "prism"
    gamma: float | None = None
    output_rule: str = "random"
    warmup_rounds: int = 0
    rank_allocation: str = "uniform"
    kernels: tuple[tuple[str, int], ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.strategy not in prism_tf.STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(prism_tf.STRATEGIES)}")
        if int(self.warmup_rounds) < 0:
            raise ValueError(f"--warmup-rounds must be >= 0, got {self.warmup_rounds}")
        budget.parse_rank_allocation(self.rank_allocation)
        if self.rank_allocation != "uniform" and self.keep_mix:
            raise ValueError("--rank-allocation flops sizes one sub-model; it cannot be combined with --keep-mix")

    def _kernels(self, keep_ratio: float | None) -> dict[str, int] | None:
        # The allocation is for the method's own keep ratio (keep_mix is refused with it).
        if self.kernels is None or (keep_ratio is not None and keep_ratio != self.keep_ratio):
            return None
        return dict(self.kernels)

    def sizes(self, plan: SubmodelPlan, keep_ratio: float | None = None) -> dict[str, int]:
        keep = self.keep_ratio if keep_ratio is None else keep_ratio
        return budget.spectral_sizes(plan, keep, self.output_keep, kernels=self._kernels(keep_ratio))

    def strategy_of_round(self, round_index: int | None) -> str:
        """The sampling strategy of the round of index ``round_index``: ``top`` during warm-up, else ``strategy``."""
        if round_index is not None and int(round_index) < int(self.warmup_rounds):
            return "top"
        return self.strategy

    def match_cost(self, target: CostBudget) -> tuple[Method, Mapping[str, float], dict[str, Any]]:
        """Uniform allocation: as it is. ``flops[:ALPHA]``: the kernels per group that spend PriSM's uniform client
        flops where a kernel is cheap (`prism_tf.budget.flops_aware_kernels`), recorded as ``kernels``."""
        alpha = budget.parse_rank_allocation(self.rank_allocation)
        if alpha is None:
            return super().match_cost(target)
        if target.factorized is None:
            raise ValueError("--rank-allocation flops needs the factorized server model in the budget")
        plan = SubmodelPlan.of(target.factorized)
        kernels = budget.flops_aware_kernels(target.factorized, plan, self.keep_ratio, self.output_keep, alpha=alpha)
        method = dataclasses.replace(self, kernels=tuple(sorted(kernels.items())))
        matched = budget.submodel_cost(target.factorized, plan, method.sizes(plan))
        return method, matched, {"rank_allocation": self.rank_allocation, "kernels": dict(sorted(kernels.items()))}

    def with_budget(self, info: Mapping[str, Any]) -> Method:
        if info.get("kernels"):
            return dataclasses.replace(self, kernels=tuple(sorted((g, int(k)) for g, k in info["kernels"].items())))
        return self

    def select(
        self,
        plan: SubmodelPlan,
        singular_values: Mapping[str, np.ndarray],
        seed: tuple[int, ...],
        *,
        keep_ratio: float | None = None,
        clients_per_round: int | None = None,
        round_index: int | None = None,
    ) -> Selection:
        keep = self.keep_ratio if keep_ratio is None else keep_ratio
        return sample_from_singular_values(
            singular_values, keep, seed, self.strategy_of_round(round_index), gamma=self.gamma,
            clients_per_round=clients_per_round, plan=plan, output_keep=self.output_keep,
            output_rule=self.output_rule, kernels=self._kernels(keep_ratio))


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class PriSM(SpectralMethod):
    """PriSM (Niu et al., TMLR 2023): sampled principal kernels, ``p_i ∝ s_i^γ`` by default (docs/algorithm.md §2)."""

    name = "prism"


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class FedHM(SpectralMethod):
    """FedHM (Yao et al., 2021): every client the same top-k principal kernels (a fixed low rank)."""

    name = "fedhm"

    strategy: str = dataclasses.field(default="top", init=False)


__all__ = ["FedHM", "PriSM", "SpectralMethod"]
