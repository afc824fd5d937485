"""Width-scalable models for federated experiments (normalization: docs/algorithm.md §6 and
docs/pitfalls.md, "BatchNorm under sub-models").

All are functional Keras models (so `prism_tf.factorize` can clone them) with ``norm`` = ``"batch"`` (Keras
BatchNorm; its moving statistics are averaged over clients like other weights), ``"group"`` (GroupNorm, as in the
NeurIPS'24 follow-up) or ``"none"``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import tensorflow as tf

NORMS = ("batch", "group", "none")


def _norm(kind: str, channels: int, name: str) -> tf.keras.layers.Layer | None:
    if kind == "batch":
        return tf.keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=name)
    if kind == "group":
        groups = max(1, channels // 4) if channels % 4 == 0 else 1
        groups = min(groups, 32)
        while channels % groups:
            groups -= 1
        return tf.keras.layers.GroupNormalization(groups=groups, epsilon=1e-5, name=name)
    if kind == "none":
        return None
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


def _conv_norm_relu(x, filters: int, kernel: int, stride: int, norm: str, name: str, relu: bool = True):
    x = tf.keras.layers.Conv2D(
        filters, kernel, strides=stride, padding="same", use_bias=norm == "none",
        kernel_initializer="he_normal", name=f"{name}_conv",
    )(x)
    layer = _norm(norm, filters, f"{name}_norm")
    if layer is not None:
        x = layer(x)
    return tf.keras.layers.ReLU(name=f"{name}_relu")(x) if relu else x


def _check(width: int, num_classes: int, input_shape: Sequence[int]) -> None:
    if int(width) < 1:
        raise ValueError(f"width must be a positive integer, got {width!r}")
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes!r}")
    if len(tuple(input_shape)) != 3:
        raise ValueError(f"input_shape must be (height, width, channels), got {tuple(input_shape)}")


def resnet18(
    width: int = 64, num_classes: int = 10, input_shape: Sequence[int] = (32, 32, 3), norm: str = "batch"
) -> tf.keras.Model:
    """ResNet-18 for CIFAR (3×3 stem, no max-pool; He et al. 2016): stages of width ``w, 2w, 4w, 8w``.

    ``width=64`` is the paper's 11.2 M-parameter model; ``width=16`` (~0.70 M) suits CPUs.
    """
    _check(width, num_classes, input_shape)
    inputs = tf.keras.Input(shape=tuple(input_shape), name="image")
    x = _conv_norm_relu(inputs, width, 3, 1, norm, "stem")
    channels = width
    for stage, multiplier in enumerate((1, 2, 4, 8), start=1):
        filters = width * multiplier
        for block in (1, 2):
            stride = 2 if stage > 1 and block == 1 else 1
            name = f"stage{stage}_block{block}"
            shortcut = x
            y = _conv_norm_relu(x, filters, 3, stride, norm, f"{name}_1")
            y = _conv_norm_relu(y, filters, 3, 1, norm, f"{name}_2", relu=False)
            if stride != 1 or channels != filters:
                shortcut = _conv_norm_relu(x, filters, 1, stride, norm, f"{name}_shortcut", relu=False)
            x = tf.keras.layers.Add(name=f"{name}_add")([y, shortcut])
            x = tf.keras.layers.ReLU(name=f"{name}_out")(x)
            channels = filters
    x = tf.keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = tf.keras.layers.Dense(num_classes, name="classifier")(x)
    return tf.keras.Model(inputs, outputs, name=f"resnet18_w{width}")


def vgg11(
    width: int = 64, num_classes: int = 10, input_shape: Sequence[int] = (32, 32, 3), norm: str = "batch"
) -> tf.keras.Model:
    """VGG-11 for CIFAR (Simonyan & Zisserman 2015, config A) with a 2-layer head of ``8·width`` units."""
    _check(width, num_classes, input_shape)
    plan = (1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M")
    inputs = tf.keras.Input(shape=tuple(input_shape), name="image")
    x = inputs
    conv = 0
    for item in plan:
        if item == "M":
            if x.shape[1] > 1 and x.shape[2] > 1:
                x = tf.keras.layers.MaxPooling2D(2, name=f"pool{conv}")(x)
            continue
        conv += 1
        x = _conv_norm_relu(x, width * item, 3, 1, norm, f"conv{conv}")
    x = tf.keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = tf.keras.layers.Dense(8 * width, activation="relu", name="fc1")(x)
    outputs = tf.keras.layers.Dense(num_classes, name="classifier")(x)
    return tf.keras.Model(inputs, outputs, name=f"vgg11_w{width}")


def small_cnn(
    width: int = 32, num_classes: int = 10, input_shape: Sequence[int] = (32, 32, 3), norm: str = "none"
) -> tf.keras.Model:
    """A 4-conv CNN (widths ``w, 2w, 2w, 4w``) with a hidden Dense layer: quick to train, for tests and demos."""
    _check(width, num_classes, input_shape)
    inputs = tf.keras.Input(shape=tuple(input_shape), name="image")
    x = _conv_norm_relu(inputs, width, 3, 1, norm, "conv1")
    x = _conv_norm_relu(x, 2 * width, 3, 2, norm, "conv2")
    x = _conv_norm_relu(x, 2 * width, 3, 1, norm, "conv3")
    x = _conv_norm_relu(x, 4 * width, 3, 2, norm, "conv4")
    x = tf.keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = tf.keras.layers.Dense(4 * width, activation="relu", name="fc1")(x)
    outputs = tf.keras.layers.Dense(num_classes, name="classifier")(x)
    return tf.keras.Model(inputs, outputs, name=f"small_cnn_w{width}")


@tf.keras.utils.register_keras_serializable(package="prism_tf")
class PositionEmbedding(tf.keras.layers.Layer):
    """Adds a learned ``[tokens, dim]`` position table to ``[batch, tokens, dim]`` inputs (ViT; travels whole)."""

    def __init__(self, initializer: str = "random_normal", **kwargs) -> None:
        super().__init__(**kwargs)
        self.initializer = tf.keras.initializers.get(initializer)

    def build(self, input_shape: tf.TensorShape) -> None:
        _, tokens, dim = tf.TensorShape(input_shape).as_list()
        self.table = self.add_weight(name="table", shape=(tokens, dim), initializer=self.initializer)
        self.built = True

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        return inputs + tf.cast(self.table, inputs.dtype)

    def get_config(self) -> dict:
        return {**super().get_config(), "initializer": tf.keras.initializers.serialize(self.initializer)}


# (dim, depth, heads, mlp ratio): the authors' DeiT-tiny shape and smaller ones for CPU benches.
VIT_PRESETS = {"deit_tiny": (192, 12, 3, 4.0), "small": (96, 6, 3, 4.0), "tiny": (64, 4, 2, 2.0),
               "micro": (32, 2, 2, 2.0)}


def vit(
    width: int = 64, num_classes: int = 10, input_shape: Sequence[int] = (32, 32, 3), norm: str = "layer", *,
    depth: int = 4, heads: int | None = None, mlp_ratio: float = 2.0, patch: int = 4, preset: str | None = None,
) -> tf.keras.Model:
    """A Vision Transformer for small images (Dosovitskiy et al. 2021): ``patch×patch`` patches (a strided conv,
    kept whole as a first conv), learned positions, ``depth`` pre-norm blocks ``x + MHA(LN(x))``, ``x +
    MLP(LN(x))`` (MLP: ``Dense(mlp_ratio·width, gelu) → Dense(width)``), mean over tokens, a linear classifier.

    ``width`` is the embedding dimension; ``preset`` (`VIT_PRESETS`: ``deit_tiny`` is the authors' DeiT-tiny
    shape, 192 × 12 blocks × 3 heads) sets ``width``, ``depth``, ``heads`` and ``mlp_ratio``. `prism_tf.factorize`
    factorizes the MLP Dense layers (the authors' DeiT runs); the attention projections travel whole.
    """
    if preset is not None:
        if preset not in VIT_PRESETS:
            raise ValueError(f"unknown ViT preset {preset!r}; choose one of {', '.join(VIT_PRESETS)}")
        width, depth, heads, mlp_ratio = VIT_PRESETS[preset]
    _check(width, num_classes, input_shape)
    if norm not in ("layer", "none"):
        raise ValueError(f"a ViT normalizes with LayerNorm: norm must be 'layer' or 'none', got {norm!r}")
    heads = heads or max(1, width // 32)
    if width % heads:
        raise ValueError(f"width {width} is not divisible by heads {heads}")
    height, side = int(input_shape[0]), int(input_shape[1])
    if height % patch or side % patch:
        raise ValueError(f"input {height}x{side} is not divisible into {patch}x{patch} patches")
    tokens = (height // patch) * (side // patch)

    def layer_norm(x, name):
        return tf.keras.layers.LayerNormalization(epsilon=1e-6, name=name)(x) if norm == "layer" else x

    inputs = tf.keras.Input(shape=tuple(input_shape), name="image")
    x = tf.keras.layers.Conv2D(width, patch, strides=patch, name="patch_embed")(inputs)
    x = tf.keras.layers.Reshape((tokens, width), name="tokens")(x)
    x = PositionEmbedding(name="position")(x)
    hidden = int(round(mlp_ratio * width))
    for block in range(1, depth + 1):
        name = f"block{block}"
        y = layer_norm(x, f"{name}_norm1")
        y = tf.keras.layers.MultiHeadAttention(heads, width // heads, name=f"{name}_attention")(y, y)
        x = tf.keras.layers.Add(name=f"{name}_add1")([x, y])
        y = layer_norm(x, f"{name}_norm2")
        y = tf.keras.layers.Dense(hidden, activation="gelu", name=f"{name}_mlp1")(y)
        y = tf.keras.layers.Dense(width, name=f"{name}_mlp2")(y)
        x = tf.keras.layers.Add(name=f"{name}_add2")([x, y])
    x = layer_norm(x, "final_norm")
    x = tf.keras.layers.GlobalAveragePooling1D(name="pool")(x)
    outputs = tf.keras.layers.Dense(num_classes, name="classifier")(x)
    return tf.keras.Model(inputs, outputs, name=f"vit_w{width}_d{depth}")


MODELS: dict[str, Callable[..., tf.keras.Model]] = {"resnet18": resnet18, "vgg11": vgg11, "small_cnn": small_cnn,
                                                   "vit": vit}


def build_model(name: str, **kwargs) -> tf.keras.Model:
    """Build a zoo model by name (``resnet18``, ``vgg11``, ``small_cnn``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name](**kwargs)
