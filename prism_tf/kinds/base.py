"""What the project needs to know about one Keras layer kind, in one place (docs/design.md, "Layer kinds").

A `LayerKind` is declared once per supported kind and registered (`prism_tf.kinds.register`); factorization, the
sub-model plan, the cost model, the local step and the TFLite training compiler all ask the registry instead of
testing layer types themselves (the pattern of tfmot's ``prune_registry``). The math it calls lives in
`prism_tf.spectral`; a kind only says *which* tensors and axes the math applies to.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import tensorflow as tf

from prism_tf import spectral


@dataclasses.dataclass(frozen=True)
class Rules:
    """The eligibility rules of `prism_tf.factorize` (docs/algorithm.md §1), resolved for one model.

    Attributes:
      first_conv: name of the model's first convolution (kept whole when ``skip_first_conv``), or ``None``.
      classifiers: names of layers that produce a model output (kept whole when ``skip_classifier``).
      skip_pointwise: keep 1×1 convolutions whole.
      attention: factorize attention projections (the authors keep them whole).
    """

    first_conv: str | None
    classifiers: frozenset[str]
    skip_pointwise: bool
    attention: bool = False


class TFLiteOps:
    """The primitives the TFLite training compiler (`export.tflite`) hands a kind: builtin-op forward and backward.

    Declared here so that a kind's `LayerKind.tflite_layer` can be written without importing the exporter.
    """

    def conv(self, input_shape: tuple, kernel_size: tuple[int, int], strides: tuple[int, int],
             padding: str) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
        raise NotImplementedError

    def matmul(self, x: tf.Tensor, w: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError

    def bias_add(self, x: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError

    def scale_rows(self, omega: tf.Tensor, combination: tf.Tensor) -> tf.Tensor:
        """``diag(ω)·B`` with ω frozen: the combination a principal layer applies (`prism_tf.layers`)."""
        raise NotImplementedError

    def activation(self, layer: tf.keras.layers.Layer, activation: Callable) -> Callable[[tf.Tensor], tf.Tensor]:
        raise NotImplementedError

    def reshape(self, x: tf.Tensor, shape: list[int]) -> tf.Tensor:
        """``tf.reshape`` (``-1`` for the batch); the gradient reshapes back."""
        raise NotImplementedError

    def pad(self, x: tf.Tensor, paddings: list[tuple[int, int]]) -> tf.Tensor:
        """Zero padding of each axis by ``(before, after)``; the gradient is the slice of the unpadded part."""
        raise NotImplementedError

    def gather(self, table: tf.Tensor, ids: tf.Tensor) -> tf.Tensor:
        """Rows ``table[ids]`` (an embedding lookup); the table's gradient sums each row's output gradients."""
        raise NotImplementedError

    def transpose(self, x: tf.Tensor, perm: list[int]) -> tf.Tensor:
        """TRANSPOSE by ``perm``; the gradient transposes back."""
        raise NotImplementedError

    def add(self, *xs: tf.Tensor) -> tf.Tensor:
        """The sum of equally shaped tensors (no broadcasting)."""
        raise NotImplementedError

    def unstack(self, x: tf.Tensor, axis: int) -> list[tf.Tensor]:
        """The slices of ``x`` along a static ``axis`` (UNPACK; a recurrent layer's time steps)."""
        raise NotImplementedError

    def stack(self, xs: list[tf.Tensor], axis: int) -> tf.Tensor:
        """PACK of equally shaped tensors along a new ``axis``."""
        raise NotImplementedError

    def lstm_cell(self, z: tf.Tensor, c: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """One Keras LSTM step (tanh/sigmoid) from the pre-activations ``z`` ``[batch, 4H]`` and the cell state:
        ``(h', c')``."""
        raise NotImplementedError

    def gru_cell(self, projected: tf.Tensor, inner: tf.Tensor, h: tf.Tensor) -> tf.Tensor:
        """One Keras GRU step (``reset_after=True``, tanh/sigmoid) from ``x·W + b_in``, ``h·U + b_rec`` and ``h``."""
        raise NotImplementedError

    def attention(self, query: tf.Tensor, key: tf.Tensor, value: tf.Tensor, heads: int, key_dim: int,
                  value_dim: int) -> tf.Tensor:
        """Keras's multi-head attention of projected ``[batch, tokens, heads·size]`` inputs, heads merged."""
        raise NotImplementedError

    def unsupported(self, layer: tf.keras.layers.Layer, why: str = "") -> ValueError:
        raise NotImplementedError


# (inputs, training, updates) -> output: one compiled layer of the TFLite training module.
CompiledLayer = Callable[[list, bool, list], tf.Tensor]


class LayerKind:
    """One factorizable Keras layer kind: a plain layer (``source``) and its principal-kernel form (``principal``).

    Subclasses set the class attributes and implement the methods that raise `NotImplementedError`; the rest is
    shared by every kind whose weights are ``kernel`` (fan-in axes, then the output axis) and ``bias``.
    """

    name: ClassVar[str]
    source: ClassVar[type]  # the Keras layer it replaces (matched by exact type for factorization)
    principal: ClassVar[type]  # the prism_tf layer holding its principal kernels
    width_key: ClassVar[str]  # the config entry of the output width ("filters", "units")
    is_conv: ClassVar[bool] = False  # a convolution: the model's first one sees raw inputs (`Rules.first_conv`)
    is_classifier: ClassVar[bool] = False  # may produce a model output (`Rules.classifiers`)
    pairs: ClassVar[tuple[str, ...]] = ("",)  # the principal layer's factor pairs (`prism_tf.layers`)

    # --- matching ------------------------------------------------------------------------------------------
    def holds(self, layer: tf.keras.layers.Layer) -> bool:
        """``layer`` is this kind's plain or principal layer (exact type)."""
        return type(layer) is self.source or type(layer) is self.principal

    def covers(self, layer: tf.keras.layers.Layer) -> bool:
        """``layer`` is an instance of either form (subclasses included): what cost and weight decay go by."""
        return isinstance(layer, self.source | self.principal)

    # --- factorization (docs/algorithm.md §1) --------------------------------------------------------------
    def ineligibility(self, layer: tf.keras.layers.Layer, rules: Rules) -> str | None:
        """Why the plain ``layer`` is kept whole, or ``None`` if `prism_tf.factorize` replaces it."""
        raise NotImplementedError

    def kernel_shape(self, layer: tf.keras.layers.Layer) -> tuple[int, ...]:
        return tuple(int(d) for d in layer.kernel.shape)

    def kernel_shapes(self, layer: tf.keras.layers.Layer) -> dict[str, tuple[int, ...]]:
        """The shape of each factor pair's kernel, by pair (``{"": shape}`` for a single-kernel kind)."""
        return {"": self.kernel_shape(layer)}

    def full_ranks(self, layer: tf.keras.layers.Layer) -> dict[str, int]:
        """Per pair, ``min(rows, out)`` of its kernel as a matrix: the number of principal kernels at full rank."""
        return {pair: matrix_rank(shape) for pair, shape in self.kernel_shapes(layer).items()}

    def to_principal(self, config: dict[str, Any], ranks: Mapping[str, int]) -> tf.keras.layers.Layer:
        """The principal layer with ``ranks`` kernels per pair for a plain layer's ``config`` (a new, unbuilt
        layer)."""
        common = dict(rank=ranks[""], activation=config.get("activation"), use_bias=config.get("use_bias", True),
                      name=config["name"], trainable=config.get("trainable", True), dtype=config.get("dtype"))
        return self.principal(**self.shape_config(config), **common)

    def shape_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """The entries of a plain layer's config that a principal layer of this kind takes as they are."""
        raise NotImplementedError

    def to_plain(self, layer: tf.keras.layers.Layer) -> tf.keras.layers.Layer:
        """The plain Keras layer a principal ``layer`` represents (unbuilt; `prism_tf.unfactorize`)."""
        config = {k: v for k, v in layer.get_config().items() if k in self.plain_keys}
        return self.source(**config, activation=layer.activation, use_bias=layer.use_bias, name=layer.name,
                           dtype=layer.dtype)

    plain_keys: ClassVar[tuple[str, ...]] = ()

    def load_factors(self, principal: tf.keras.layers.Layer, plain: tf.keras.layers.Layer) -> None:
        """Set ``principal``'s factors to the SVD of ``plain``'s kernel (exact at full rank) and copy the bias."""
        a, b, s = spectral.factorize_kernel(plain.kernel)
        principal.set_factors(a, b, s, bias=plain.bias if plain.use_bias else None)

    def plain_weights(self, principal: tf.keras.layers.Layer) -> list:
        """``[W, bias]`` of the plain layer ``principal`` represents, ``W = A·diag(ω)·B``."""
        return [principal.dense_kernel().numpy()] + ([principal.bias.numpy()] if principal.use_bias else [])

    # --- sub-model plan (`prism_tf.plan`) ------------------------------------------------------------------
    def mixes_channels(self, layer: tf.keras.layers.Layer) -> bool:
        """Whether ``layer``'s outputs are a fresh channel group (every output mixes every input channel)."""
        return True

    def out_size(self, layer: tf.keras.layers.Layer) -> int:
        return int(getattr(layer, self.width_key))

    def weight_axes(self, layer: tf.keras.layers.Layer, weight: str, src: str | None, dst: str | None,
                    ndim: int) -> list[tuple[int, str | None]]:
        """The ``(axis, group)`` pairs a selection slices ``weight`` of ``layer`` by (docs/algorithm.md §2).

        A layer with several kernels (`pairs`) is sliced by its kernel groups only: its outputs are no channel
        group (`mixes_channels` is false for them)."""
        if type(layer) is self.principal and self.pairs != ("",):
            return pair_axes(layer, weight, ndim) or []
        if self.pairs != ("",):
            return []
        if type(layer) is self.principal:
            k = layer.name
            if weight == "principal_kernels":
                return [(ndim - 2, src), (ndim - 1, k)]
            if weight == "combination":
                return [(0, k), (1, dst)]
            if weight == "bias":
                return [(0, dst)]
            return [(0, k)]  # singular values, kernel scale
        if weight == "kernel":
            return [(ndim - 2, src), (ndim - 1, dst)]
        return [(0, dst)]

    # --- cost (`prism_tf.cost`, docs/algorithm.md §5) ------------------------------------------------------
    def flops(self, layer: tf.keras.layers.Layer, in_shape: Sequence, out_shape: Sequence) -> tuple[int, int]:
        """Multiply-adds per example and the extra activation values backprop keeps (a principal layer's
        rank-wide response map)."""
        raise NotImplementedError

    def node_flops(self, layer: tf.keras.layers.Layer, node: Any) -> tuple[int, int]:
        """`flops` of one call of ``layer`` (a Keras node): a layer called twice (a tied embedding) costs both."""
        return self.flops(layer, *node_shapes(node))

    # --- local step (`prism_tf.local_step`, docs/algorithm.md §7) ------------------------------------------
    def decayed(self, layer: tf.keras.layers.Layer) -> list[tf.Variable]:
        """The variables weight decay applies to: a plain layer's kernel (a principal layer's factors get the
        Frobenius decay instead)."""
        return [] if isinstance(layer, self.principal) else [layer.kernel]

    # --- on-device training (`export.tflite`) --------------------------------------------------------------
    def tflite_layer(self, layer: tf.keras.layers.Layer, shapes: list[tuple], ops: TFLiteOps) -> CompiledLayer:
        """``layer``'s forward with the exporter's builtin-gradient primitives."""
        raise ops.unsupported(layer)

    def finish_linear(self, layer: tf.keras.layers.Layer, y: tf.Tensor, ops: TFLiteOps,
                      act: Callable[[tf.Tensor], tf.Tensor]) -> tf.Tensor:
        """After the first product: a principal layer's ``⊛₁ₓ₁ diag(ω)·B`` (the combination `prism_tf.layers`
        computes), the bias, the activation."""
        if type(layer) is self.principal:
            combination = ops.scale_rows(tf.convert_to_tensor(layer.kernel_scale),
                                         tf.convert_to_tensor(layer.combination))
            y = ops.matmul(y, combination)
        if layer.use_bias:
            y = ops.bias_add(y, tf.convert_to_tensor(layer.bias))
        return act(y)

    def first_factor(self, layer: tf.keras.layers.Layer) -> tf.Tensor:
        """The tensor the first product uses: ``A`` for a principal layer, the kernel for a plain one."""
        return tf.convert_to_tensor(layer.principal_kernels if type(layer) is self.principal else layer.kernel)


class ConvKind(LayerKind):
    """A convolution (``Conv1D``, ``Conv2D``): the ``[*kernel_size, Cin, Cout]`` kernel as a
    ``[prod(kernel_size)·Cin, Cout]`` matrix; the first convolution (it sees the raw input) and pointwise ones are
    kept whole by default, grouped and channels-first ones always."""

    width_key = "filters"
    is_conv = True
    plain_keys = ("filters", "kernel_size", "strides", "padding", "dilation_rate")

    def ineligibility(self, layer: tf.keras.layers.Layer, rules: Rules) -> str | None:
        if layer.data_format != "channels_last":
            return "channels_first is not supported"
        if layer.groups != 1:
            return (f"grouped conv (groups={layer.groups}): its kernel is block-diagonal and a low-rank factor would "
                    "mix the groups; one conv per group (groups=1) is factorized")
        if layer.name == rules.first_conv:
            return "first conv (sees the raw input)"
        if rules.skip_pointwise and all(k == 1 for k in layer.kernel_size):
            return "1x1 conv"
        return None

    def shape_config(self, config: dict[str, Any]) -> dict[str, Any]:
        return {k: config[k] for k in self.plain_keys}

    def mixes_channels(self, layer: tf.keras.layers.Layer) -> bool:
        if type(layer) is self.principal:
            return True
        return layer.groups == 1 and layer.data_format == "channels_last"

    def flops(self, layer: tf.keras.layers.Layer, in_shape: Sequence, out_shape: Sequence) -> tuple[int, int]:
        window = 1
        for k in layer.kernel_size:
            window *= int(k)
        n = pixels(out_shape)
        if isinstance(layer, self.principal):
            return n * layer.rank * (window * int(in_shape[-1]) + layer.filters), n * layer.rank
        return n * window * int(in_shape[-1]) // layer.groups * layer.filters, 0


def node_shapes(node: Any) -> tuple[tuple, tuple]:
    """The first input's and first output's shapes of a Keras node (one call of a layer)."""
    def first(shapes: Any) -> tuple:
        shapes = shapes if isinstance(shapes, list) else [shapes]
        return tuple(shapes[0])
    return first(node.input_shapes), first(node.output_shapes)


class WholeKind:
    """A kind that is never factorized but whose cost `prism_tf.cost` counts (depthwise, separable convs)."""

    name: ClassVar[str]
    source: ClassVar[type]
    why: ClassVar[str]  # why it is kept whole, and what would change that (`prism_tf.factorize`'s report)

    def covers(self, layer: tf.keras.layers.Layer) -> bool:
        return isinstance(layer, self.source)

    def flops(self, layer: tf.keras.layers.Layer, in_shape: Sequence, out_shape: Sequence) -> tuple[int, int]:
        raise NotImplementedError

    def decayed(self, layer: tf.keras.layers.Layer) -> list[tf.Variable]:
        return []

    def node_flops(self, layer: tf.keras.layers.Layer, node: Any) -> tuple[int, int]:
        return self.flops(layer, *node_shapes(node))


def group_name(layer_name: str, pair: str) -> str:
    """The kernel group of a layer's factor pair: the layer's name for its only pair, else ``layer/pair``
    (docs/algorithm.md §1)."""
    return f"{layer_name}/{pair}" if pair else layer_name


def pair_axes(layer: tf.keras.layers.Layer, weight: str, ndim: int) -> list[tuple[int, str | None]] | None:
    """The kernel-group axes of a multi-pair principal layer's factor ``weight`` (``A``: last axis, ``B``, ``s``,
    ``ω``: first), or ``None`` if ``weight`` is not a factor."""
    found = layer.role_of(weight)
    if found is None:
        return None
    group = group_name(layer.name, found[0])
    return [(ndim - 1, group)] if found[1] == "principal_kernels" else [(0, group)]


def matrix_rank(shape: Sequence[int]) -> int:
    """``min(rows, out)`` of a ``[..., out]`` kernel viewed as a ``[prod(...), out]`` matrix."""
    rows = 1
    for d in shape[:-1]:
        rows *= int(d)
    return min(rows, int(shape[-1]))


def pixels(out_shape: Sequence) -> int:
    """Output positions per example (1 for a vector output)."""
    n = 1
    for d in out_shape[1:-1]:
        n *= int(d)
    return n


def pair_product(layer: tf.keras.layers.Layer, pair: str, ops: TFLiteOps) -> Callable[[tf.Tensor], tf.Tensor]:
    """``x ↦ (x·A)·(diag(ω)·B)`` through factor pair ``pair`` of a multi-pair principal ``layer``, with the
    exporter's primitives: the product `prism_tf.layers.pairs.FactorPairsMixin.project` computes. ``diag(ω)·B`` is
    formed once (at the call of this function), so a layer applying it at every time step shares it."""
    factors = layer.factors(pair)
    principal = tf.convert_to_tensor(factors.principal)
    combination = ops.scale_rows(tf.convert_to_tensor(factors.scale), tf.convert_to_tensor(factors.combination))
    return lambda x: ops.matmul(ops.matmul(x, principal), combination)
