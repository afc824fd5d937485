"""``LSTM`` ↔ `PrincipalLSTM`, ``GRU`` ↔ `PrincipalGRU` (docs/algorithm.md §1, "Layers with several kernels"): the
input kernel ``[in, G·H]`` and the recurrent kernel ``[H, G·H]`` are two factor pairs, ``layer/input`` and
``layer/recurrent``, sampled independently (the PriSM authors' LSTM runs); the state size ``H`` stays whole, so a
recurrent layer's outputs are never channel-sliced."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow as tf

from prism_tf import spectral
from prism_tf.kinds.base import CompiledLayer, LayerKind, Rules, TFLiteOps, pair_product
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

    def flops(self, layer: tf.keras.layers.Layer, in_shape: Sequence, out_shape: Sequence) -> tuple[int, int]:
        steps, features, width = int(in_shape[1]), int(in_shape[-1]), self.gates * layer.units
        if isinstance(layer, self.principal):
            r_in, r_rec = layer.ranks[INPUT], layer.ranks[RECURRENT]
            per_step = r_in * (features + width) + r_rec * (layer.units + width)
            return steps * per_step, steps * (r_in + r_rec)
        return steps * width * (features + layer.units), 0

    def decayed(self, layer: tf.keras.layers.Layer) -> list[tf.Variable]:
        return [] if isinstance(layer, self.principal) else [layer.cell.kernel, layer.cell.recurrent_kernel]

    # --- on-device training (`export.tflite`) --------------------------------------------------------------
    def tflite_layer(self, layer: tf.keras.layers.Layer, shapes: list[tuple], ops: TFLiteOps) -> CompiledLayer:
        """The layer unrolled over its static number of steps (docs/export.md, "On-device training").

        Every step's input half ``x·W + b`` at once (FULLY_CONNECTED on ``[batch·T, in]``; a principal layer through
        ``A_W``, then ``diag(ω_W)·B_W``), UNPACK over time, then per step ``h·U`` (through ``A_U``, then
        ``diag(ω_U)·B_U``) and the fused cell (`TFLiteOps.lstm_cell`, `TFLiteOps.gru_cell`) with its analytic
        backward pass; PACK of the outputs for ``return_sequences``. The state starts at zero.
        """
        if len(shapes) != 1 or len(shapes[0]) != 3 or None in shapes[0][1:]:
            raise ops.unsupported(layer, "expects one [batch, steps, features] input with a known number of steps")
        self.check_tflite(layer, ops)
        principal = type(layer) is self.principal
        units = int(layer.units)

        def recurrent_layer(inputs: list, training: bool, updates: list) -> tf.Tensor:
            (x,) = inputs
            if principal:
                input_product, recurrent_product = pair_product(layer, INPUT, ops), pair_product(layer, RECURRENT, ops)
                bias = layer.bias
            else:
                kernel = tf.convert_to_tensor(layer.cell.kernel)
                recurrent_kernel = tf.convert_to_tensor(layer.cell.recurrent_kernel)
                input_product = lambda v: ops.matmul(v, kernel)  # noqa: E731
                recurrent_product = lambda v: ops.matmul(v, recurrent_kernel)  # noqa: E731
                bias = layer.cell.bias if layer.cell.use_bias else None
            input_bias, recurrent_bias = self.tflite_biases(bias, ops)
            projected = input_product(x)  # [batch, T, G·H]
            if input_bias is not None:
                projected = ops.bias_add(projected, input_bias)
            zeros = tf.zeros(tf.stack([tf.shape(x)[0], units]), x.dtype)  # FILL: no gradient
            outputs = self.tflite_steps(ops.unstack(projected, 1), zeros, recurrent_product, recurrent_bias, ops)
            return ops.stack(outputs, 1) if layer.return_sequences else outputs[-1]

        return recurrent_layer

    def check_tflite(self, layer: tf.keras.layers.Layer, ops: TFLiteOps) -> None:
        """Refuse what the unrolled builtin step does not compute (the `TFLiteOps.unsupported` error)."""
        cell = layer if type(layer) is self.principal else layer.cell
        activation = getattr(cell.activation, "__name__", repr(cell.activation))
        recurrent_activation = getattr(cell.recurrent_activation, "__name__", repr(cell.recurrent_activation))
        if (activation, recurrent_activation) != ("tanh", "sigmoid"):
            raise ops.unsupported(layer, f"activations {activation}/{recurrent_activation} (only Keras's default "
                                         "tanh/sigmoid)")
        bad = [name for name, flag in (
            ("go_backwards", layer.go_backwards), ("return_state", layer.return_state),
            ("stateful", getattr(layer, "stateful", False)), ("time_major", getattr(layer, "time_major", False)),
            ("dropout", getattr(layer, "dropout", 0) > 0),
            ("recurrent_dropout", getattr(layer, "recurrent_dropout", 0) > 0)) if flag]
        if bad:
            raise ops.unsupported(layer, " and ".join(bad))

    def tflite_biases(self, bias: tf.Variable | None, ops: TFLiteOps) -> tuple[tf.Tensor | None, tf.Tensor | None]:
        """The bias added to the input half and the one added to ``h·U`` (GRU's ``reset_after`` row)."""
        return (None if bias is None else tf.convert_to_tensor(bias)), None

    def tflite_steps(self, steps: list, zeros: tf.Tensor, recurrent_product, recurrent_bias, ops: TFLiteOps) -> list:
        raise NotImplementedError


class LSTMKind(_RecurrentKind):
    name = "lstm"
    source = tf.keras.layers.LSTM
    principal = PrincipalLSTM
    gates = 4

    def tflite_steps(self, steps: list, zeros: tf.Tensor, recurrent_product, recurrent_bias, ops: TFLiteOps) -> list:
        h, c, outputs = None, zeros, []
        for projected in steps:
            z = projected if h is None else ops.add(projected, recurrent_product(h))  # h₀ = 0: h₀·U = 0
            h, c = ops.lstm_cell(z, c)
            outputs.append(h)
        return outputs


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

    def check_tflite(self, layer: tf.keras.layers.Layer, ops: TFLiteOps) -> None:
        if type(layer) is self.source and not layer.reset_after:
            raise ops.unsupported(layer, "reset_after=False (only Keras's default reset_after=True)")
        super().check_tflite(layer, ops)

    def tflite_biases(self, bias: tf.Variable | None, ops: TFLiteOps) -> tuple[tf.Tensor | None, tf.Tensor | None]:
        if bias is None:
            return None, None
        input_bias, recurrent_bias = ops.unstack(tf.convert_to_tensor(bias), 0)  # [2, 3H]: no strided slice
        return input_bias, recurrent_bias

    def tflite_steps(self, steps: list, zeros: tf.Tensor, recurrent_product, recurrent_bias, ops: TFLiteOps) -> list:
        h, outputs = zeros, []
        for projected in steps:
            inner = recurrent_product(h)
            if recurrent_bias is not None:
                inner = ops.bias_add(inner, recurrent_bias)
            h = ops.gru_cell(projected, inner, h)
            outputs.append(h)
        return outputs
