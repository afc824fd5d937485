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

import numpy as np

import prism_tf
from prism_tf import budget
from prism_tf.federated.methods.base import Method, register
from prism_tf.plan import SubmodelPlan
from prism_tf.sampling import Selection, sample_from_singular_values


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpectralMethod(Method):
    """A client trains ``ceil(keep_ratio · r)`` principal kernels of each factorized layer (docs/algorithm.md §2).

    Attributes:
      strategy: sampling strategy (`prism_tf.STRATEGIES`).
      gamma: PriSM's exponent (default by keep ratio).
      output_rule: ``random`` or ``first``: which owned output channels ``output_keep`` keeps.
    """

    spectral = True

    strategy: str = "prism"
    gamma: float | None = None
    output_rule: str = "random"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.strategy not in prism_tf.STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(prism_tf.STRATEGIES)}")

    def sizes(self, plan: SubmodelPlan, keep_ratio: float | None = None) -> dict[str, int]:
        keep = self.keep_ratio if keep_ratio is None else keep_ratio
        return budget.spectral_sizes(plan, keep, self.output_keep)

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
            singular_values, keep, seed, self.strategy, gamma=self.gamma, clients_per_round=clients_per_round,
            plan=plan, output_keep=self.output_keep, output_rule=self.output_rule)


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
