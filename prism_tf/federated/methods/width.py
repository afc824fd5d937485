"""Width methods: a client trains a subset of the channels of every free channel group of the unfactorized model.

docs/algorithm.md §4, §5. They slice channel fraction ``p`` = `WidthMethod.channel_fraction` (``width_fraction``
when the run matched PriSM's cost, else the nominal ``keep_ratio``):

| method        | what a client gets                                              | deployed           |
|---------------|-----------------------------------------------------------------|--------------------|
| `heterofl`    | the first ``ceil(p·C)`` channels of every free channel group    | the widest slice   |
| `fjord`       | ordered dropout: the first channels at a width drawn per client | the widest slice   |
| `fed_dropout` | random ``ceil(p·C)`` channels of every free channel group       | the server model   |
| `fedrolex`    | a window of ``ceil(p·C)`` channels rolling by one per round     | the server model   |

Randomness (`prism_tf.streams`): channels of client ``c`` in the round of index ``t`` from the named streams of
``(seed, t, c)``; FjORD's per-round width from ``((seed, t, c), "fjord_width")``.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

import prism_tf
from prism_tf import budget, streams
from prism_tf.federated.methods.base import CostBudget, Method, register
from prism_tf.plan import SubmodelPlan
from prism_tf.sampling import Selection, channel_selection, rolling_window

if TYPE_CHECKING:
    import tensorflow as tf


@dataclasses.dataclass(frozen=True, kw_only=True)
class WidthMethod(Method):
    """Clients train width slices of the server model; subclasses choose the channels (`channels`).

    Attributes:
      width_fraction: the channel fraction for a client of capacity ``keep_ratio``; ``None`` uses ``keep_ratio``
        itself (nominal). `equal_cost_method` sets it to match PriSM's cost.
    """

    width = True

    width_fraction: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.width_fraction is not None:
            prism_tf.sampling.check_keep_ratio(self.width_fraction, "width_fraction")

    @property
    def widest(self) -> float:
        """The widest width a client trains, as a multiple of the method's channel fraction (1: all clients)."""
        return 1.0

    def channel_fraction(self, keep_ratio: float | None = None) -> float:
        """The channel fraction for a client of capacity ``keep_ratio`` (default the method's).

        Nominal (``width_fraction=None``): the capacity itself. Otherwise ``width_fraction · keep_ratio /
        self.keep_ratio`` (capped at 1): exactly ``width_fraction`` at the method's keep ratio, FjORD's grid widths
        multiply it.
        """
        keep = self.keep_ratio if keep_ratio is None else keep_ratio
        if self.width_fraction is None:
            return float(keep)
        return float(min(1.0, self.width_fraction * keep / self.keep_ratio))

    def sizes(self, plan: SubmodelPlan, keep_ratio: float | None = None) -> dict[str, int]:
        keep = self.keep_ratio if keep_ratio is None else keep_ratio
        return budget.width_sizes(plan, self.channel_fraction(keep))

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
        fraction = self.channel_fraction(keep)
        channels = self.channels(plan, plan.free_channel_groups(), fraction, seed, round_index)
        return Selection({}, fraction, self.name, channels=channels)

    @abc.abstractmethod
    def channels(self, plan: SubmodelPlan, groups: Sequence[str], fraction: float, seed: tuple[int, ...],
                 round_index: int | None) -> dict[str, np.ndarray]:
        """The kept channels of each of ``groups`` at channel ``fraction`` for the client of ``seed``."""

    def match_cost(self, target: CostBudget) -> tuple[Method, Mapping[str, float], dict[str, Any]]:
        """The ``width_fraction`` whose (widest) client model's cost is closest to PriSM's
        (`prism_tf.budget.match_width_fraction`)."""
        if self.keep_mix:
            raise ValueError("equal_cost_method: a keep_mix has one budget per ratio; match width methods at one "
                             "ratio")
        plan = SubmodelPlan.of(target.server_model)
        fraction, matched = budget.match_width_fraction(target.server_model, plan, target.target[target.metric],
                                                        target.metric)
        method = dataclasses.replace(self, width_fraction=min(1.0, fraction / self.widest))
        return method, matched, {"width_fraction": method.width_fraction}

    def with_budget(self, info: Mapping[str, Any]) -> Method:
        if info.get("width_fraction") is None:
            return self
        return dataclasses.replace(self, width_fraction=float(info["width_fraction"]))


@dataclasses.dataclass(frozen=True, kw_only=True)
class NestedWidthMethod(WidthMethod):
    """Nested slices: a client keeps the first channels of every group, so the widest slice any client trains is
    a model of its own, and that is what a user deploys (the server's other channels are never trained)."""

    def channels(self, plan: SubmodelPlan, groups: Sequence[str], fraction: float, seed: tuple[int, ...],
                 round_index: int | None) -> dict[str, np.ndarray]:
        return channel_selection(plan, groups, fraction, "first", seed)

    def deployed_models(self, server_model: tf.keras.Model) -> dict[str, tf.keras.Model]:
        """The widest slice its clients trained as ``deployed``, the full server model beside it as ``server``."""
        fraction = self.channel_fraction(self.keep_ratio * self.widest)
        plan = SubmodelPlan.of(server_model)
        channels = {g: np.arange(prism_tf.sampling.num_kept(fraction, plan.groups[g].size), dtype=np.int32)
                    for g in plan.free_channel_groups()}
        sub = prism_tf.extract(server_model, Selection({}, fraction, self.name, channels=channels))
        return {"deployed": sub, "server": server_model}


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class HeteroFL(NestedWidthMethod):
    """HeteroFL (Diao et al., ICLR 2021): the first ``ceil(p·C)`` channels of every free channel group."""

    name = "heterofl"


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class FjORD(NestedWidthMethod):
    """FjORD (Horváth et al., NeurIPS 2021): ordered dropout, nested slices at a width drawn per client and round.

    Attributes:
      fjord_widths: the width grid, as fractions of the method's channel fraction (its largest width, 1.0 by
        default, is ``width_fraction``).
    """

    name = "fjord"

    fjord_widths: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)

    @property
    def widest(self) -> float:
        return max(self.fjord_widths)

    def client_keep_ratio(self, seed: int, client_id: int, round_index: int = 0) -> float:
        """The client's `capacity` times a width drawn from ``fjord_widths`` every round from the stream
        ``((seed, round_index, client), "fjord_width")`` (ordered dropout)."""
        keep = self.capacity(seed, client_id)
        grid = streams.rng((int(seed), int(round_index), int(client_id)), streams.FJORD_WIDTH)
        keep *= float(grid.choice(self.fjord_widths))
        return float(keep)


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class FedDropout(WidthMethod):
    """Federated Dropout (Caldas et al., 2018): random ``ceil(p·C)`` channels per client and round."""

    name = "fed_dropout"

    def channels(self, plan: SubmodelPlan, groups: Sequence[str], fraction: float, seed: tuple[int, ...],
                 round_index: int | None) -> dict[str, np.ndarray]:
        return channel_selection(plan, groups, fraction, "random", seed)


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class FedRolex(WidthMethod):
    """FedRolex (Alam et al., NeurIPS 2022): a window of channels starting at ``round_index mod C`` that every
    client of the round shares (`prism_tf.sampling.rolling_window`)."""

    name = "fedrolex"

    def channels(self, plan: SubmodelPlan, groups: Sequence[str], fraction: float, seed: tuple[int, ...],
                 round_index: int | None) -> dict[str, np.ndarray]:
        if round_index is None:
            raise ValueError("fedrolex: select needs round_index (its window rolls with the round)")
        return {g: rolling_window(plan.groups[g].size, fraction, round_index) for g in groups}


__all__ = ["FedDropout", "FedRolex", "FjORD", "HeteroFL", "NestedWidthMethod", "WidthMethod"]
