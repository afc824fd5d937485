"""Whole-model methods: every client trains all of the (unfactorized) server model.

docs/algorithm.md §4, §5.

| method   | server model       | what a client gets                               |
|----------|--------------------|--------------------------------------------------|
| `fedavg` | original           | everything (the upper bound)                     |
| `small`  | original, narrower | everything of a model as cheap as the sub-models |
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from prism_tf import budget
from prism_tf.federated.methods.base import CostBudget, Method, register
from prism_tf.plan import SubmodelPlan
from prism_tf.sampling import Selection


@dataclasses.dataclass(frozen=True, kw_only=True)
class WholeModelMethod(Method):
    """A client trains the whole server model: no group is sliced."""

    def sizes(self, plan: SubmodelPlan, keep_ratio: float | None = None) -> dict[str, int]:
        return {}

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
        return Selection({}, 1.0, self.name)


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class FedAvg(WholeModelMethod):
    """FedAvg (McMahan et al., AISTATS 2017): the full model on every client; its client cost is the full model's."""

    name = "fedavg"

    def match_cost(self, target: CostBudget) -> tuple[Method, Mapping[str, float], dict[str, Any]]:
        return self, target.full, {}


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class Small(WholeModelMethod):
    """A narrower model trained whole, as cheap as a PriSM sub-model (docs/algorithm.md §5): the server trains it
    as FedAvg trains the full one (`trained_method`); its width is the budget's ``small_width``."""

    name = "small"
    always_matched = True

    def match_cost(self, target: CostBudget) -> tuple[Method, Mapping[str, float], dict[str, Any]]:
        if target.build_model is None or target.max_width is None:
            raise ValueError("equal_cost_method: 'small' needs build_model(width) and max_width")
        width, matched = budget.match_small_width(target.build_model, target.target[target.metric],
                                                  target.max_width, target.metric)
        return self, matched, {"small_width": width}

    def model_width(self, info: Mapping[str, Any], width: int) -> int:
        return int(info.get("small_width") or width)

    def trained_method(self) -> Method:
        return FedAvg(keep_ratio=self.keep_ratio, output_keep=self.output_keep, keep_mix=self.keep_mix)


__all__ = ["FedAvg", "Small", "WholeModelMethod"]
