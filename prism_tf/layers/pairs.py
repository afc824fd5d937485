"""Layers with several kernels, each held as its own factor pair (docs/algorithm.md §1, "Layers with several
kernels").

A pair ``p`` of layer ``L`` owns the weights ``p_principal_kernels`` (``A_p``, ``[fan_in, r_p]``), ``p_combination``
(``B_p``, ``[r_p, out_p]``), ``p_singular_values`` and ``p_kernel_scale`` (``s_p`` and ``ω_p``, frozen); its kernel
group is ``L/p``: a client keeps its own sample of every pair's kernels, drawn independently (the authors factorize an
LSTM's input and recurrent kernels separately). A product through a pair is ``(x·A_p)·(diag(ω_p)·B_p)``: the
rank-``r_p`` factors themselves, never a masked dense kernel.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import tensorflow as tf

from prism_tf import spectral
from prism_tf.layers.principal import COMBINATION, PRINCIPAL, ROLES, SCALE, SINGULAR_VALUES, Factors


def pair_weight_name(pair: str, role: str) -> str:
    """The name of pair ``pair``'s weight ``role`` (``input_principal_kernels``)."""
    return f"{pair}_{role}"


class FactorPairsMixin:
    """Weights, ranks and factor I/O of a layer with the factor pairs ``pairs`` (ranks by pair in ``ranks``)."""

    pairs: ClassVar[tuple[str, ...]]
    ranks: dict[str, int]

    def _init_ranks(self, ranks: Mapping[str, int]) -> None:
        missing = set(self.pairs) - set(ranks)
        extra = set(ranks) - set(self.pairs)
        if missing or extra:
            raise ValueError(f"{type(self).__name__} '{self.name}': ranks must name the pairs "
                             f"{', '.join(self.pairs)}, got {sorted(ranks)}")
        self.ranks = {p: int(ranks[p]) for p in self.pairs}
        for pair, rank in self.ranks.items():
            if rank < 1:
                raise ValueError(f"{type(self).__name__} '{self.name}': rank of '{pair}' must be >= 1, got {rank}")
        self._factors: dict[str, Factors] = {}

    def _add_pair(self, pair: str, fan_in_shape: tuple[int, ...], out_dim: int, initializer: Any) -> None:
        rank = self.ranks[pair]
        initializer = type(initializer).from_config(initializer.get_config())  # a fresh draw for every pair
        principal = self.add_weight(name=pair_weight_name(pair, PRINCIPAL), shape=(*fan_in_shape, rank),
                                    initializer=initializer, trainable=True)
        combination = self.add_weight(name=pair_weight_name(pair, COMBINATION), shape=(rank, out_dim),
                                      initializer="orthogonal", trainable=True)
        singular = self.add_weight(name=pair_weight_name(pair, SINGULAR_VALUES), shape=(rank,), initializer="ones",
                                   trainable=False)
        scale = self.add_weight(name=pair_weight_name(pair, SCALE), shape=(rank,), initializer="ones",
                                trainable=False)
        self._factors[pair] = Factors(principal, combination, singular, scale)

    def factors(self, pair: str) -> Factors:
        """The variables of factor pair ``pair``."""
        return self._factors[pair]

    def pair_rank(self, pair: str) -> int:
        return self.ranks[pair]

    def get_prunable_weights(self) -> list[tf.Variable]:
        """Every pair's trainable factors ``A_p`` and ``B_p``, pair by pair: what tfmot's magnitude pruning masks
        (its ``PrunableLayer`` interface; `prism_tf.compression`). ``s_p``, ``ω_p`` and biases are left alone."""
        return [v for pair in self.pairs for v in self._factors[pair][:2]]

    def set_pair_factors(self, pair: str, principal: Any, combination: Any, singular_values: Any,
                         scale: Any | None = None) -> None:
        """Assign pair ``pair``'s factors (e.g. from `spectral.factorize_kernel`); ``scale`` defaults to ones."""
        f = self._factors[pair]
        f.principal.assign(principal)
        f.combination.assign(combination)
        f.singular_values.assign(singular_values)
        f.scale.assign(tf.ones([self.ranks[pair]]) if scale is None else scale)

    def pair_kernel(self, pair: str) -> tf.Tensor:
        """The kernel pair ``pair`` represents, ``A·diag(ω)·B``."""
        f = self._factors[pair]
        return spectral.rebuild_kernel(f.principal, f.scale[:, tf.newaxis] * f.combination)

    def project(self, x: tf.Tensor, pair: str) -> tf.Tensor:
        """``(x·A)·(diag(ω)·B)`` over the last axis of ``x``: the product through the rank-``r`` factors."""
        f = self._factors[pair]
        responses = tf.tensordot(x, tf.cast(f.principal, x.dtype), axes=1)
        combination = tf.cast(f.scale, x.dtype)[:, tf.newaxis] * tf.cast(f.combination, x.dtype)
        return tf.tensordot(responses, combination, axes=1)

    @classmethod
    def role_of(cls, weight: str) -> tuple[str, str] | None:
        """``(pair, role)`` of the weight named ``weight`` if it is a factor (`pair_weight_name`), else ``None``."""
        for pair in cls.pairs:
            for role in ROLES:
                if weight == pair_weight_name(pair, role):
                    return pair, role
        return None

    @classmethod
    def config_with_ranks(cls, config: dict[str, Any], ranks: Mapping[str, int]) -> dict[str, Any]:
        """``config`` with the rank of every pair replaced (``ranks`` by pair name)."""
        return {**config, "ranks": {p: int(ranks[p]) for p in cls.pairs}}
