"""Width-scalable models for federated experiments (normalization: docs/algorithm.md §6 and
docs/pitfalls.md, "BatchNorm under sub-models").

All are functional Keras models (so `prism_tf.factorize` can clone them). The convolutional ones take ``norm`` =
``"batch"`` (Keras BatchNorm; its moving statistics are averaged over clients like other weights), ``"group"``
(GroupNorm, as in the NeurIPS'24 follow-up) or ``"none"``; the ViT ``"layer"`` or ``"none"``; the LSTMs only
``"none"``. `MODELS` maps a name to its builder, `MODEL_SPECS` to what it takes (`ModelSpec`: images, token ids or
feature frames; one label per example or one per step; its norms, the first its default). Every builder has the
signature ``(width, num_classes, input_shape, norm, ...)``; the token models also take ``vocabulary_size``.
"""

from __future__ import annotations

import dataclasses
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


def _check_sequence(width: int, num_classes: int, input_shape: Sequence[int], rank: int, what: str) -> None:
    if int(width) < 1:
        raise ValueError(f"width must be a positive integer, got {width!r}")
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes!r}")
    if len(tuple(input_shape)) != rank:
        raise ValueError(f"input_shape must be {what}, got {tuple(input_shape)}")


def _only_norm(norm: str, allowed: tuple[str, ...], model: str) -> None:
    if norm not in allowed:
        raise ValueError(f"{model} takes norm {' or '.join(repr(n) for n in allowed)}, got {norm!r}")


IMDB_VOCABULARY = 10000  # `prism_tf.federated.sequences.load_imdb`'s default ``num_words``


def lstm(
    width: int = 256, num_classes: int = 2, input_shape: Sequence[int] = (200,), norm: str = "none", *,
    vocabulary_size: int | None = None, embedding_dim: int = 64,
) -> tf.keras.Model:
    """The PriSM authors' IMDB sentiment classifier (Niu et al., TMLR 2023, the IMDB/LSTM experiments):
    ``Embedding(vocabulary_size, 64) → LSTM(256, return_sequences=True) → LSTM(256) → Dense(num_classes)``.

    ``width`` is the LSTMs' hidden size (256 in the paper), ``embedding_dim`` the embedding's (64);
    ``vocabulary_size`` defaults to IMDB's 10,000 words (`prism_tf.federated.sequences.load_imdb`). Inputs are int32
    token ids ``[T]``. Plain Keras LSTMs (``unroll=False``, default activations: the fused kernel TFF runs).
    """
    _check_sequence(width, num_classes, input_shape, 1, "(tokens,)")
    _only_norm(norm, ("none",), "an LSTM")
    inputs = tf.keras.Input(shape=tuple(input_shape), dtype="int32", name="tokens")
    x = tf.keras.layers.Embedding(int(vocabulary_size or IMDB_VOCABULARY), int(embedding_dim), name="embedding")(inputs)
    x = tf.keras.layers.LSTM(width, return_sequences=True, name="lstm1")(x)
    x = tf.keras.layers.LSTM(width, name="lstm2")(x)
    outputs = tf.keras.layers.Dense(num_classes, name="classifier")(x)
    return tf.keras.Model(inputs, outputs, name=f"lstm_w{width}")


def charlstm(
    width: int = 256, num_classes: int = 86, input_shape: Sequence[int] = (80,), norm: str = "none", *,
    vocabulary_size: int | None = None, embedding_dim: int = 8,
) -> tf.keras.Model:
    """A next-character model, the Shakespeare LSTM of McMahan et al. (AISTATS 2017, §3; LEAF's and TFF's
    Shakespeare baseline): ``Embedding(vocabulary_size, 8) → LSTM(256) → LSTM(256) → Dense(num_classes)`` at every
    step (both LSTMs ``return_sequences=True``).

    ``width`` is the LSTMs' hidden size (256 in the paper), ``embedding_dim`` the embedding's (8). Inputs are int32
    character ids ``[T]``, outputs logits ``[T, num_classes]`` (labels: the next character at every step);
    ``num_classes`` is the vocabulary (86 characters in the paper) and ``vocabulary_size`` defaults to it.
    """
    _check_sequence(width, num_classes, input_shape, 1, "(characters,)")
    _only_norm(norm, ("none",), "an LSTM")
    inputs = tf.keras.Input(shape=tuple(input_shape), dtype="int32", name="characters")
    x = tf.keras.layers.Embedding(int(vocabulary_size or num_classes), int(embedding_dim), name="embedding")(inputs)
    x = tf.keras.layers.LSTM(width, return_sequences=True, name="lstm1")(x)
    x = tf.keras.layers.LSTM(width, return_sequences=True, name="lstm2")(x)
    outputs = tf.keras.layers.Dense(num_classes, name="classifier")(x)
    return tf.keras.Model(inputs, outputs, name=f"charlstm_w{width}")


def _conv1d_norm_relu(x, filters: int, kernel: int, norm: str, name: str):
    x = tf.keras.layers.Conv1D(filters, kernel, padding="same", use_bias=norm == "none",
                               kernel_initializer="he_normal", name=f"{name}_conv")(x)
    layer = _norm(norm, filters, f"{name}_norm")
    if layer is not None:
        x = layer(x)
    return tf.keras.layers.ReLU(name=f"{name}_relu")(x)


def kws(
    width: int = 64, num_classes: int = 12, input_shape: Sequence[int] = (49, 40), norm: str = "batch",
) -> tf.keras.Model:
    """A keyword-spotting net of temporal convolutions over ``[frames, features]`` (e.g. Speech Commands' 49 MFCC
    frames × 40 coefficients; the features are the channels, as in TC-ResNet, Choi et al., Interspeech 2019):
    ``Conv1D(w, 5)``, max-pool, ``Conv1D(2w, 3)``, max-pool, ``Conv1D(2w, 3)``, ``Conv1D(4w, 3)`` (each with
    ``norm`` and ReLU), global average pooling over time, ``Dense(num_classes)`` (12 classes: Speech Commands v2's
    10 keywords, silence, unknown).

    ``width`` is the first convolution's channels. Inputs are float32 ``[T, F]``.
    """
    _check_sequence(width, num_classes, input_shape, 2, "(frames, features)")
    inputs = tf.keras.Input(shape=tuple(input_shape), name="features")
    x = _conv1d_norm_relu(inputs, width, 5, norm, "conv1")
    if x.shape[1] > 1:
        x = tf.keras.layers.MaxPooling1D(2, padding="same", name="pool1")(x)
    x = _conv1d_norm_relu(x, 2 * width, 3, norm, "conv2")
    if x.shape[1] > 1:
        x = tf.keras.layers.MaxPooling1D(2, padding="same", name="pool2")(x)
    x = _conv1d_norm_relu(x, 2 * width, 3, norm, "conv3")
    x = _conv1d_norm_relu(x, 4 * width, 3, norm, "conv4")
    x = tf.keras.layers.GlobalAveragePooling1D(name="gap")(x)
    outputs = tf.keras.layers.Dense(num_classes, name="classifier")(x)
    return tf.keras.Model(inputs, outputs, name=f"kws_w{width}")


INPUTS = ("image", "tokens", "features")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What a zoo model takes and gives.

    Attributes:
      inputs: ``"image"`` (``[H, W, C]`` pixels), ``"tokens"`` (int32 ids ``[T]``) or ``"features"`` (float32
        ``[T, F]`` frames); one of `INPUTS`.
      task: ``"classification"`` (one label per example) or ``"next_token"`` (one per step,
        `prism_tf.federated.sequences.TASKS`).
      norms: the ``norm`` values the builder accepts, the CLI's default first (`default_norm`).
    """

    inputs: str
    task: str
    norms: tuple[str, ...]

    @property
    def default_norm(self) -> str:
        """The normalization a run uses when none is asked for (``--norm`` unset; ``build_model(norm=None)``)."""
        return self.norms[0]


MODELS: dict[str, Callable[..., tf.keras.Model]] = {
    "resnet18": resnet18, "vgg11": vgg11, "small_cnn": small_cnn, "vit": vit, "lstm": lstm, "charlstm": charlstm,
    "kws": kws}
MODEL_SPECS: dict[str, ModelSpec] = {
    "resnet18": ModelSpec("image", "classification", NORMS),
    "vgg11": ModelSpec("image", "classification", NORMS),
    "small_cnn": ModelSpec("image", "classification", NORMS),
    "vit": ModelSpec("image", "classification", ("layer", "none")),
    "lstm": ModelSpec("tokens", "classification", ("none",)),
    "charlstm": ModelSpec("tokens", "next_token", ("none",)),
    "kws": ModelSpec("features", "classification", NORMS),
}


def model_spec(name: str) -> ModelSpec:
    """`MODEL_SPECS` of ``name`` (a model registered without one is an image classifier taking `NORMS`)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODEL_SPECS.get(name, ModelSpec("image", "classification", NORMS))


def build_model(name: str, **kwargs) -> tf.keras.Model:
    """Build a zoo model by name (one of `MODELS`); ``norm=None`` is the model's `ModelSpec.default_norm` (no
    ``norm`` at all: the builder's own default).

    ``vocabulary_size`` is passed on to the token models only (`ModelSpec.inputs` ``"tokens"``), so one call site
    can build any model of the zoo.
    """
    spec = model_spec(name)
    if "norm" in kwargs and kwargs["norm"] is None:
        kwargs["norm"] = spec.default_norm
    vocabulary_size = kwargs.pop("vocabulary_size", None)
    if spec.inputs == "tokens":
        kwargs["vocabulary_size"] = vocabulary_size
    return MODELS[name](**kwargs)
