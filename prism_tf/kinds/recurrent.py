"""``LSTM`` ↔ `PrincipalLSTM`, ``GRU`` ↔ `PrincipalGRU` (docs/algorithm.md §1, "Layers with several kernels"): the
input kernel ``[in, G·H]`` and the recurrent kernel ``[H, G·H]`` are two factor pairs, ``layer/input`` and
``layer/recurrent``, sampled independently (the PriSM authors' LSTM runs); the state size ``H`` stays whole, so a
recurrent layer's outputs are never channel-sliced."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow as tf

from prism_tf import spectral
from prism_tf.kinds.base import LayerKind, Rules, pair_axes
from prism_tf.layers.recurrent import INPUT, RECURRENT, PrincipalGRU, PrincipalLSTM


class _RecurrentKind(LayerKind):
    width_key = "units"
    pairs = (INPUT, RECURRENT)
    gates: int
    plain_keys = ("units", "activation", "recurrent_activation", "use_bias", "return_sequences", "return_state",
                  "go_backwards")

    def ineligibility(self, layer: tf.keras.layers.Layer, rules: Rules) -> str | None:
        unsupported = [name for name, bad in (
            ("stateful=True", layer.stateful), ("time_major=True", layer.time_major),
            ("dropout", layer.dropout > 0), ("recurrent_dropout", layer.recurrent_dropout > 0),
        ) if bad]
        if unsupported:
            return (f"{' and '.join(unsupported)} not supported by the principal cell (set dropout to 0 and put a "
                    "Dropout layer before it)")
        return None

    def kernel_shapes(self, layer: tf.keras.layers.Layer) -> dict[str, tuple[int, ...]]:
        return {INPUT: tuple(int(d) for d in layer.cell.kernel.shape),
                RECURRENT: tuple(int(d) for d in layer.cell.recurrent_kernel.shape)}

    def to_principal(self, config: dict[str, Any], ranks: Mapping[str, int]) -> tf.keras.layers.Layer:
        return self.principal(ranks=dict(ranks), **{k: config[k] for k in self.plain_keys}, name=config["name"],
                              trainable=config.get("trainable", True), dtype=config.get("dtype"))

    def to_plain(self, layer: tf.keras.layers.Layer) -> tf.keras.layers.Layer:
        config = {k: v for k, v in layer.get_config().items() if k in self.plain_keys}
        return self.source(**config, name=layer.name, dtype=layer.dtype, **self.plain_extra())

    def plain_extra(self) -> dict[str, Any]:
        return {}

    def load_factors(self, principal: tf.keras.layers.Layer, plain: tf.keras.layers.Layer) -> None:
        for pair, kernel in ((INPUT, plain.cell.kernel), (RECURRENT, plain.cell.recurrent_kernel)):
            a, b, s = spectral.factorize_kernel(kernel)
            principal.set_pair_factors(pair, a, b, s)
        if plain.cell.use_bias:
            principal.bias.assign(plain.cell.bias)

    def plain_weights(self, principal: tf.keras.layers.Layer) -> list:
        kernels = [principal.pair_kernel(INPUT).numpy(), principal.pair_kernel(RECURRENT).numpy()]
        return kernels + ([principal.bias.numpy()] if principal.use_bias else [])

    def mixes_channels(self, layer: tf.keras.layers.Layer) -> bool:
        return False  # the state stays whole: what follows sees all H features

    def weight_axes(self, layer: tf.keras.layers.Layer, weight: str, src: str | None, dst: str | None,
                    ndim: int) -> list[tuple[int, str | None]]:
        if type(layer) is self.principal:
            return pair_axes(layer, weight, ndim) or []
        return []

    def flops(self, layer: tf.keras.layers.Layer, in_shape: Sequence, out_shape: Sequence) -> tuple[int, int]:
        steps, features, width = int(in_shape[1]), int(in_shape[-1]), self.gates * layer.units
        if isinstance(layer, self.principal):
            r_in, r_rec = layer.ranks[INPUT], layer.ranks[RECURRENT]
            per_step = r_in * (features + width) + r_rec * (layer.units + width)
            return steps * per_step, steps * (r_in + r_rec)
        return steps * width * (features + layer.units), 0

    def decayed(self, layer: tf.keras.layers.Layer) -> list[tf.Variable]:
        return [] if isinstance(layer, self.principal) else [layer.cell.kernel, layer.cell.recurrent_kernel]


class LSTMKind(_RecurrentKind):
    name = "lstm"
    source = tf.keras.layers.LSTM
    principal = PrincipalLSTM
    gates = 4


class GRUKind(_RecurrentKind):
    name = "gru"
    source = tf.keras.layers.GRU
    principal = PrincipalGRU
    gates = 3

    def ineligibility(self, layer: tf.keras.layers.Layer, rules: Rules) -> str | None:
        if not layer.reset_after:
            return "GRU with reset_after=False (the principal cell is Keras's default reset_after=True form)"
        return super().ineligibility(layer, rules)

    def plain_extra(self) -> dict[str, Any]:
        return {"reset_after": True}
