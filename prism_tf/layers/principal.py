"""Keras layers holding a kernel as principal kernels: `PrincipalConv2D` and `PrincipalDense` (docs/algorithm.md §1).

``y = act(((x ⊛ A) · diag(ω)) ⊛₁ₓ₁ B + b)`` where ``A`` holds ``rank`` principal kernels (ordinary filters),
``B`` the ``rank → out`` combination, ``ω`` frozen per-kernel multipliers (1 except for the NeurIPS'24 strategies,
docs/algorithm.md §2) and ``s`` the frozen singular values used only for sampling. The singular values are split as
``√s``
into both trainable factors (the authors' ``Conv2d_Orth_v2``). A full model and every client's sub-model use the
same layer classes; a sub-model's layers simply have a smaller ``rank``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import tensorflow as tf

from prism_tf import spectral

# Order of a principal layer's weights in `get_weights()` / `weights`; other modules rely on it.
PRINCIPAL, COMBINATION, BIAS, SINGULAR_VALUES, SCALE = (
    "principal_kernels",
    "combination",
    "bias",
    "singular_values",
    "kernel_scale",
)


ROLES = (PRINCIPAL, COMBINATION, SINGULAR_VALUES, SCALE)


class Factors(NamedTuple):
    """One factor pair's variables: ``A`` (principal kernels), ``B`` (combination), ``s`` and ``ω``."""

    principal: tf.Variable
    combination: tf.Variable
    singular_values: tf.Variable
    scale: tf.Variable


class _PrincipalMixin:
    """Weights, config and factor I/O shared by the single-pair principal layers.

    Every principal layer names its factor pairs in ``pairs`` (docs/design.md, "Layer kinds"): ``("",)`` for a layer
    with one kernel (its kernel group is the layer's name), several for layers with several kernels (an LSTM's
    input and recurrent kernels, attention's projections; groups ``layer/pair``). `factors`, `pair_rank`,
    `set_pair_factors` and `config_with_ranks` are the pair interface the rest of the project uses.
    """

    rank: int
    pairs: ClassVar[tuple[str, ...]] = ("",)

    def factors(self, pair: str = "") -> Factors:
        """The variables of factor pair ``pair`` (the only pair, ``""``)."""
        return Factors(self.principal_kernels, self.combination, self.singular_values, self.kernel_scale)

    def pair_rank(self, pair: str = "") -> int:
        return self.rank

    def set_pair_factors(self, pair: str, principal: Any, combination: Any, singular_values: Any,
                         scale: Any | None = None) -> None:
        """`set_factors` without the bias: what re-factorization writes."""
        self.set_factors(principal, combination, singular_values, scale=scale)

    @classmethod
    def config_with_ranks(cls, config: dict[str, Any], ranks: Mapping[str, int]) -> dict[str, Any]:
        """``config`` with the rank of every pair replaced (``ranks`` by pair name)."""
        return {**config, "rank": int(ranks[""])}

    @classmethod
    def role_of(cls, weight: str) -> tuple[str, str] | None:
        """``(pair, role)`` of the weight named ``weight`` if it is a factor (`ROLES`), else ``None``."""
        return ("", weight) if weight in ROLES else None

    def _add_factor_weights(self, fan_in_shape: tuple[int, ...], out_dim: int) -> None:
        self.principal_kernels = self.add_weight(
            name=PRINCIPAL,
            shape=(*fan_in_shape, self.rank),
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
            trainable=True,
        )
        self.combination = self.add_weight(
            name=COMBINATION,
            shape=(self.rank, out_dim),
            initializer=self.combination_initializer,
            trainable=True,
        )
        self.bias = (
            self.add_weight(name=BIAS, shape=(out_dim,), initializer=self.bias_initializer, trainable=True)
            if self.use_bias
            else None
        )
        # Frozen: s only drives sampling probabilities, ω is fixed per round by the sampling strategy.
        self.singular_values = self.add_weight(
            name=SINGULAR_VALUES, shape=(self.rank,), initializer="ones", trainable=False
        )
        self.kernel_scale = self.add_weight(name=SCALE, shape=(self.rank,), initializer="ones", trainable=False)

    def _combine(self, responses: tf.Tensor) -> tf.Tensor:
        # ω scales the [rank, out] combination, not the rank-wide response map: one small multiply instead of a
        # pass over (and, for backprop, a stored copy of) every response (bench/speed.py, legacy form).
        combination = tf.cast(self.kernel_scale, responses.dtype)[:, tf.newaxis] * tf.cast(
            self.combination, responses.dtype)
        outputs = tf.tensordot(responses, combination, axes=1)
        if self.use_bias:
            outputs = tf.nn.bias_add(outputs, tf.cast(self.bias, outputs.dtype))
        return self.activation(outputs)

    def set_factors(
        self,
        principal: Any,
        combination: Any,
        singular_values: Any,
        bias: Any | None = None,
        scale: Any | None = None,
    ) -> None:
        """Assign factors (e.g. from `spectral.factorize_kernel`); ``scale`` defaults to ones."""
        self.principal_kernels.assign(principal)
        self.combination.assign(combination)
        self.singular_values.assign(singular_values)
        self.kernel_scale.assign(tf.ones([self.rank]) if scale is None else scale)
        if bias is not None and self.use_bias:
            self.bias.assign(bias)

    def get_prunable_weights(self) -> list[tf.Variable]:
        """The trainable factors ``A`` and ``B``: what tfmot's magnitude pruning masks (its ``PrunableLayer``
        interface; `prism_tf.compression`). ``s``, ``ω`` and the bias are left alone."""
        return [self.principal_kernels, self.combination]

    def dense_kernel(self) -> tf.Tensor:
        """The kernel this layer represents, ``A·diag(ω)·B`` in the replaced layer's kernel shape."""
        return spectral.rebuild_kernel(
            self.principal_kernels, self.kernel_scale[:, tf.newaxis] * self.combination
        )

    def _factor_config(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "activation": tf.keras.activations.serialize(self.activation),
            "use_bias": self.use_bias,
            "kernel_initializer": tf.keras.initializers.serialize(self.kernel_initializer),
            "combination_initializer": tf.keras.initializers.serialize(self.combination_initializer),
            "bias_initializer": tf.keras.initializers.serialize(self.bias_initializer),
            "kernel_regularizer": tf.keras.regularizers.serialize(self.kernel_regularizer),
        }

    def _init_factor_args(
        self,
        rank: int,
        activation: Any,
        use_bias: bool,
        kernel_initializer: Any,
        combination_initializer: Any,
        bias_initializer: Any,
        kernel_regularizer: Any,
    ) -> None:
        if int(rank) < 1:
            raise ValueError(f"{type(self).__name__} '{self.name}': rank must be >= 1, got {rank}")
        self.rank = int(rank)
        self.activation = tf.keras.activations.get(activation)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = tf.keras.initializers.get(kernel_initializer)
        self.combination_initializer = tf.keras.initializers.get(combination_initializer)
        self.bias_initializer = tf.keras.initializers.get(bias_initializer)
        self.kernel_regularizer = tf.keras.regularizers.get(kernel_regularizer)


class _PrincipalConv(_PrincipalMixin, tf.keras.layers.Layer):
    """The convolutions' shared body: ``rank`` filters of ``kernel_size × Cin`` (``A``), then a pointwise
    combination ``B``; subclasses set the number of spatial dimensions and the paddings they take."""

    spatial: int = 2
    paddings: tuple[str, ...] = ("valid", "same")

    def __init__(
        self,
        filters: int,
        kernel_size: int | tuple[int, ...],
        rank: int,
        strides: int | tuple[int, ...] = 1,
        padding: str = "valid",
        dilation_rate: int | tuple[int, ...] = 1,
        activation: Any = None,
        use_bias: bool = True,
        kernel_initializer: Any = "he_normal",
        combination_initializer: Any = "orthogonal",
        bias_initializer: Any = "zeros",
        kernel_regularizer: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.kernel_size = _ntuple(kernel_size, self.spatial)
        self.strides = _ntuple(strides, self.spatial)
        self.dilation_rate = _ntuple(dilation_rate, self.spatial)
        self.padding = padding.lower()
        if self.padding not in self.paddings:
            raise ValueError(f"{type(self).__name__} '{self.name}': padding must be one of "
                             f"{', '.join(repr(p) for p in self.paddings)}, got {padding!r}")
        self._init_factor_args(
            rank, activation, use_bias, kernel_initializer, combination_initializer, bias_initializer,
            kernel_regularizer,
        )
        self.input_spec = tf.keras.layers.InputSpec(ndim=self.spatial + 2)

    def build(self, input_shape: tf.TensorShape) -> None:
        channels = tf.TensorShape(input_shape)[-1]
        if channels is None:
            raise ValueError(f"{type(self).__name__} '{self.name}': the channel dimension of the input must be "
                             "known")
        self._add_factor_weights((*self.kernel_size, int(channels)), self.filters)
        self.input_spec = tf.keras.layers.InputSpec(ndim=self.spatial + 2, axes={-1: int(channels)})
        self.built = True

    def _padded(self, inputs: tf.Tensor) -> tuple[tf.Tensor, str]:
        return inputs, self.padding.upper()

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        inputs, padding = self._padded(inputs)
        responses = tf.nn.convolution(
            inputs,
            tf.cast(self.principal_kernels, inputs.dtype),
            strides=self.strides,
            padding=padding,
            dilations=self.dilation_rate,
        )
        return self._combine(responses)

    def compute_output_shape(self, input_shape: tf.TensorShape) -> tf.TensorShape:
        shape = tf.TensorShape(input_shape).as_list()
        spatial = []
        for i in range(self.spatial):
            length, padding = shape[1 + i], self.padding
            if padding == "causal":  # left zeros of (k − 1)·d, then a valid convolution
                length = None if length is None else length + (self.kernel_size[i] - 1) * self.dilation_rate[i]
                padding = "valid"
            spatial.append(_conv_output_length(length, self.kernel_size[i], padding, self.strides[i],
                                               self.dilation_rate[i]))
        return tf.TensorShape([shape[0], *spatial, self.filters])

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            filters=self.filters,
            kernel_size=self.kernel_size,
            strides=self.strides,
            padding=self.padding,
            dilation_rate=self.dilation_rate,
            **self._factor_config(),
        )
        return config


@tf.keras.utils.register_keras_serializable(package="prism_tf")
class PrincipalConv2D(_PrincipalConv):
    """A ``Conv2D`` as ``rank`` principal kernels followed by a 1×1 combination (docs/algorithm.md §1).

    Supports the ``Conv2D`` options of the layer it replaces: ``strides``, ``padding`` (``valid``/``same``),
    ``dilation_rate``, bias and activation; ``channels_last`` and ``groups=1`` only.
    """

    spatial = 2


@tf.keras.utils.register_keras_serializable(package="prism_tf")
class PrincipalConv1D(_PrincipalConv):
    """A ``Conv1D`` as ``rank`` principal kernels (``k×Cin`` filters) followed by a pointwise combination
    (docs/algorithm.md §1): keyword spotting and text CNNs.

    Supports the ``Conv1D`` options of the layer it replaces: ``strides``, ``padding`` (``valid``/``same``/
    ``causal``), ``dilation_rate``, bias and activation; ``channels_last`` and ``groups=1`` only.
    """

    spatial = 1
    paddings = ("valid", "same", "causal")

    def _padded(self, inputs: tf.Tensor) -> tuple[tf.Tensor, str]:
        if self.padding != "causal":
            return inputs, self.padding.upper()
        # Keras's causal padding: (k − 1)·d zeros on the left, then a valid convolution.
        left = (self.kernel_size[0] - 1) * self.dilation_rate[0]
        return tf.pad(inputs, [[0, 0], [left, 0], [0, 0]]), "VALID"


@tf.keras.utils.register_keras_serializable(package="prism_tf")
class PrincipalDense(_PrincipalMixin, tf.keras.layers.Layer):
    """A ``Dense`` layer as ``rank`` principal kernels (rank-one terms) and their combination (docs/algorithm.md §1)."""

    def __init__(
        self,
        units: int,
        rank: int,
        activation: Any = None,
        use_bias: bool = True,
        kernel_initializer: Any = "glorot_uniform",
        combination_initializer: Any = "orthogonal",
        bias_initializer: Any = "zeros",
        kernel_regularizer: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.units = int(units)
        self._init_factor_args(
            rank, activation, use_bias, kernel_initializer, combination_initializer, bias_initializer,
            kernel_regularizer,
        )
        self.input_spec = tf.keras.layers.InputSpec(min_ndim=2)

    def build(self, input_shape: tf.TensorShape) -> None:
        features = tf.TensorShape(input_shape)[-1]
        if features is None:
            raise ValueError(f"PrincipalDense '{self.name}': the last dimension of the input must be known")
        self._add_factor_weights((int(features),), self.units)
        self.input_spec = tf.keras.layers.InputSpec(min_ndim=2, axes={-1: int(features)})
        self.built = True

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        responses = tf.tensordot(inputs, tf.cast(self.principal_kernels, inputs.dtype), axes=1)
        return self._combine(responses)

    def compute_output_shape(self, input_shape: tf.TensorShape) -> tf.TensorShape:
        return tf.TensorShape(input_shape)[:-1].concatenate([self.units])

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(units=self.units, **self._factor_config())
        return config


@tf.keras.utils.register_keras_serializable(package="prism_tf")
class PrincipalEmbedding(_PrincipalMixin, tf.keras.layers.Layer):
    """An ``Embedding`` table as ``E = A·diag(ω)·B`` (docs/algorithm.md §1, the factorized-embedding form): a token
    looks up its row of ``A`` (``rank`` principal kernels, ``[input_dim, rank]``) and the ``rank → output_dim``
    combination ``B`` maps it to the embedding. Supports ``mask_zero``."""

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        rank: int,
        mask_zero: bool = False,
        kernel_initializer: Any = "uniform",
        combination_initializer: Any = "orthogonal",
        kernel_regularizer: Any = None,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("activation", None)
        kwargs.pop("use_bias", None)
        kwargs.pop("bias_initializer", None)
        super().__init__(**kwargs)
        self.input_dim, self.output_dim = int(input_dim), int(output_dim)
        self.mask_zero = bool(mask_zero)
        self._init_factor_args(rank, None, False, kernel_initializer, combination_initializer, "zeros",
                               kernel_regularizer)

    def build(self, input_shape: tf.TensorShape) -> None:
        self._add_factor_weights((self.input_dim,), self.output_dim)
        self.built = True

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        if inputs.dtype not in (tf.int32, tf.int64):
            inputs = tf.cast(inputs, tf.int32)
        rows = tf.gather(self.principal_kernels, inputs)
        return self._combine(tf.cast(rows, self.compute_dtype))

    def compute_mask(self, inputs: tf.Tensor, mask: tf.Tensor | None = None) -> tf.Tensor | None:
        return tf.not_equal(inputs, 0) if self.mask_zero else None

    def compute_output_shape(self, input_shape: tf.TensorShape) -> tf.TensorShape:
        return tf.TensorShape(input_shape).concatenate([self.output_dim])

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        factors = self._factor_config()
        for key in ("activation", "use_bias", "bias_initializer"):
            factors.pop(key)
        config.update(input_dim=self.input_dim, output_dim=self.output_dim, mask_zero=self.mask_zero, **factors)
        return config


def _ntuple(value: int | tuple[int, ...] | list[int], n: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    if len(value) != n:
        raise ValueError(f"expected an int or {n} ints, got {value}")
    return value


def _conv_output_length(length: int | None, kernel: int, padding: str, stride: int, dilation: int) -> int | None:
    if length is None:
        return None
    effective = (kernel - 1) * dilation + 1
    if padding == "same":
        return (length + stride - 1) // stride
    return (length - effective + stride) // stride
