"""`PrincipalLSTM` and `PrincipalGRU`: recurrent layers whose input and recurrent kernels are factor pairs
(docs/algorithm.md §1, "Layers with several kernels").

The input kernel ``W`` (``[in, G·H]``, ``G`` gates) and the recurrent kernel ``U`` (``[H, G·H]``) are factorized
separately, as the PriSM authors' code samples an LSTM's ``weight_ih`` and ``weight_hh``: pairs ``input`` and
``recurrent``. A client's cell computes its gates through its rank-``k`` factors, ``x·A_W·(diag(ω)B_W)`` for all time
steps at once and ``h·A_U·(diag(ω)B_U)`` per step, so a sub-model's step costs ``k·(H + G·H)`` multiply-adds instead
of ``H·G·H``; the state size ``H`` stays whole. Gate order, activations, biases, masking, ``return_sequences``,
``return_state`` and ``go_backwards`` are Keras's (`tf.keras.layers.LSTM`, `tf.keras.layers.GRU` with
``reset_after=True``), so a full-rank principal layer computes what the Keras layer it replaces computes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import tensorflow as tf

from prism_tf.layers.pairs import FactorPairsMixin

INPUT, RECURRENT = "input", "recurrent"


def lstm_gates(z: tf.Tensor, c: tf.Tensor, activation=tf.tanh, recurrent_activation=tf.sigmoid) -> tuple:
    """One LSTM step from its pre-activations ``z = x·W + h·U + b`` (``[batch, 4H]``, Keras's gate order ``i, f, g,
    o``) and cell state ``c``: ``c' = σ(f)·c + σ(i)·tanh(g)``, ``h' = σ(o)·tanh(c')``. Returns ``(h', c', (i, f, g,
    o, tanh(c')))``: the gates are what an analytic backward pass needs (`export.tflite.ops.lstm_cell`)."""
    zi, zf, zg, zo = tf.split(z, 4, axis=-1)
    i, f, o = recurrent_activation(zi), recurrent_activation(zf), recurrent_activation(zo)
    g = activation(zg)
    c_new = f * c + i * g
    t = activation(c_new)
    return o * t, c_new, (i, f, g, o, t)


def gru_gates(projected: tf.Tensor, inner: tf.Tensor, h: tf.Tensor, activation=tf.tanh,
              recurrent_activation=tf.sigmoid) -> tuple:
    """One GRU step (``reset_after=True``) from ``projected = x·W + b_in`` and ``inner = h·U + b_rec`` (``[batch,
    3H]``, gate order ``z, r, h̃``): ``z = σ(x_z + u_z)``, ``r = σ(x_r + u_r)``, ``h̃ = tanh(x_h + r·u_h)``,
    ``h' = z·h + (1 − z)·h̃``. Returns ``(h', (z, r, h̃, u_h))`` (what `export.tflite.ops.gru_cell`'s backward
    needs)."""
    x_z, x_r, x_h = tf.split(projected, 3, axis=-1)
    u_z, u_r, u_h = tf.split(inner, 3, axis=-1)
    z = recurrent_activation(x_z + u_z)
    r = recurrent_activation(x_r + u_r)
    candidate = activation(x_h + r * u_h)
    return z * h + (1.0 - z) * candidate, (z, r, candidate, u_h)


class _PrincipalRecurrent(FactorPairsMixin, tf.keras.layers.Layer):
    """The shared body: the input projection of every step at once, then `tf.keras.backend.rnn` over the steps."""

    pairs: ClassVar[tuple[str, ...]] = (INPUT, RECURRENT)
    gates: ClassVar[int]
    states: ClassVar[int]

    def __init__(
        self,
        units: int,
        ranks: Mapping[str, int],
        activation: Any = "tanh",
        recurrent_activation: Any = "sigmoid",
        use_bias: bool = True,
        return_sequences: bool = False,
        return_state: bool = False,
        go_backwards: bool = False,
        kernel_initializer: Any = "glorot_uniform",
        recurrent_initializer: Any = "orthogonal",
        bias_initializer: Any = "zeros",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.units = int(units)
        self._init_ranks(ranks)
        self.activation = tf.keras.activations.get(activation)
        self.recurrent_activation = tf.keras.activations.get(recurrent_activation)
        self.use_bias = bool(use_bias)
        self.return_sequences, self.return_state = bool(return_sequences), bool(return_state)
        self.go_backwards = bool(go_backwards)
        self.kernel_initializer = tf.keras.initializers.get(kernel_initializer)
        self.recurrent_initializer = tf.keras.initializers.get(recurrent_initializer)
        self.bias_initializer = tf.keras.initializers.get(bias_initializer)
        self.supports_masking = True
        self.input_spec = tf.keras.layers.InputSpec(ndim=3)

    def build(self, input_shape: tf.TensorShape) -> None:
        features = tf.TensorShape(input_shape)[-1]
        if features is None:
            raise ValueError(f"{type(self).__name__} '{self.name}': the feature dimension of the input must be known")
        width = self.gates * self.units
        self._add_pair(INPUT, (int(features),), width, self.kernel_initializer)
        self._add_pair(RECURRENT, (self.units,), width, self.recurrent_initializer)
        self.bias = (self.add_weight(name="bias", shape=self.bias_shape(), initializer=self.bias_initializer,
                                     trainable=True) if self.use_bias else None)
        self.input_spec = tf.keras.layers.InputSpec(ndim=3, axes={-1: int(features)})
        self.built = True

    def bias_shape(self) -> tuple[int, ...]:
        return (self.gates * self.units,)

    def step(self, projected: tf.Tensor, states: list[tf.Tensor]) -> tuple[tf.Tensor, list[tf.Tensor]]:
        raise NotImplementedError

    def input_bias(self) -> tf.Tensor | None:
        return self.bias

    def call(self, inputs: tf.Tensor, mask: tf.Tensor | None = None, training: bool | None = None,
             initial_state: list[tf.Tensor] | None = None) -> tf.Tensor | list[tf.Tensor]:
        projected = self.project(inputs, INPUT)  # [batch, time, G·H]: every step's input half, through rank k
        bias = self.input_bias()
        if bias is not None:
            projected = projected + tf.cast(bias, projected.dtype)
        if initial_state is None:
            zeros = tf.zeros([tf.shape(inputs)[0], self.units], projected.dtype)
            initial_state = [zeros] * self.states
        if isinstance(mask, list):
            mask = mask[0]
        last, outputs, states = tf.keras.backend.rnn(
            self.step, projected, list(initial_state), go_backwards=self.go_backwards, mask=mask,
            input_length=inputs.shape[1], zero_output_for_mask=False, return_all_outputs=self.return_sequences)
        output = outputs if self.return_sequences else last
        return [output, *states] if self.return_state else output

    def compute_mask(self, inputs: tf.Tensor, mask: tf.Tensor | None = None) -> Any:
        if isinstance(mask, list):
            mask = mask[0]
        output_mask = mask if self.return_sequences else None
        return [output_mask] + [None] * self.states if self.return_state else output_mask

    def compute_output_shape(self, input_shape: tf.TensorShape) -> Any:
        shape = tf.TensorShape(input_shape).as_list()
        output = tf.TensorShape([shape[0], shape[1], self.units] if self.return_sequences
                                else [shape[0], self.units])
        return [output] + [tf.TensorShape([shape[0], self.units])] * self.states if self.return_state else output

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            units=self.units, ranks=dict(self.ranks), activation=tf.keras.activations.serialize(self.activation),
            recurrent_activation=tf.keras.activations.serialize(self.recurrent_activation), use_bias=self.use_bias,
            return_sequences=self.return_sequences, return_state=self.return_state, go_backwards=self.go_backwards,
            kernel_initializer=tf.keras.initializers.serialize(self.kernel_initializer),
            recurrent_initializer=tf.keras.initializers.serialize(self.recurrent_initializer),
            bias_initializer=tf.keras.initializers.serialize(self.bias_initializer),
        )
        return config


@tf.keras.utils.register_keras_serializable(package="prism_tf")
class PrincipalLSTM(_PrincipalRecurrent):
    """An ``LSTM`` whose input and recurrent kernels are principal-kernel factor pairs (docs/algorithm.md §1).

    Gates ``i, f, c, o`` (Keras's order): ``z = x·W + h·U + b``, ``c' = σ(f)·c + σ(i)·tanh(c̃)``,
    ``h' = σ(o)·tanh(c')`` with ``W = A_W·diag(ω_W)·B_W`` and ``U = A_U·diag(ω_U)·B_U``.
    """

    gates, states = 4, 2

    def step(self, projected: tf.Tensor, states: list[tf.Tensor]) -> tuple[tf.Tensor, list[tf.Tensor]]:
        h, c = states
        h, c, _ = lstm_gates(projected + self.project(h, RECURRENT), c, self.activation, self.recurrent_activation)
        return h, [h, c]


@tf.keras.utils.register_keras_serializable(package="prism_tf")
class PrincipalGRU(_PrincipalRecurrent):
    """A ``GRU`` (``reset_after=True``, Keras's default) whose input and recurrent kernels are principal-kernel factor
    pairs (docs/algorithm.md §1).

    Gates ``z, r, h̃`` (Keras's order): ``x_* = x·W + b_in``, ``u_* = h·U + b_rec``, ``z = σ(x_z + u_z)``,
    ``r = σ(x_r + u_r)``, ``h̃ = tanh(x_h + r·u_h)``, ``h' = z·h + (1 − z)·h̃``; the bias is ``[2, 3H]`` as Keras's.
    """

    gates, states = 3, 1

    def bias_shape(self) -> tuple[int, ...]:
        return (2, self.gates * self.units)

    def input_bias(self) -> tf.Tensor | None:
        return None if self.bias is None else self.bias[0]

    def step(self, projected: tf.Tensor, states: list[tf.Tensor]) -> tuple[tf.Tensor, list[tf.Tensor]]:
        (h,) = states
        inner = self.project(h, RECURRENT)
        if self.bias is not None:
            inner = inner + tf.cast(self.bias[1], inner.dtype)
        h, _ = gru_gates(projected, inner, h, self.activation, self.recurrent_activation)
        return h, [h]
