"""Turn any functional or Sequential Keras model into a principal-kernel model (docs/algorithm.md §1).

`factorize` clones the model, swaps each eligible ``Conv2D``/``Dense`` for a `PrincipalConv2D`/`PrincipalDense`
holding the SVD factors of its kernel (exact at full rank) and copies every other weight unchanged. The default
rules follow the authors' code: k×k convs (k > 1) and hidden Dense layers are factorized; the first conv, 1×1 convs,
the classifier, normalization and depthwise convs are kept whole. `refactorize` restores orthogonality after
training (server side, docs/algorithm.md §3).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import tensorflow as tf

from prism_tf import kinds, spectral
from prism_tf.kinds import is_principal, principal_layers, walk_layers

_PASS_THROUGH = (tf.keras.layers.Activation, tf.keras.layers.Softmax, tf.keras.layers.Dropout,
                 tf.keras.layers.ReLU)


@dataclasses.dataclass(frozen=True)
class FactorizedLayer:
    """One factorized kernel: ``name`` is its kernel group (the layer's name, or ``layer/pair`` for a layer with
    several kernels, docs/algorithm.md §1), ``layer`` the layer it belongs to."""

    name: str
    kind: str
    kernel_shape: tuple[int, ...]
    rank: int
    layer: str = ""

    def __post_init__(self) -> None:
        if not self.layer:
            object.__setattr__(self, "layer", self.name)


@dataclasses.dataclass(frozen=True)
class KeptLayer:
    name: str
    kind: str
    reason: str


@dataclasses.dataclass(frozen=True)
class FactorizationReport:
    """Which layers became principal-kernel layers and why the others travel whole."""

    factorized: tuple[FactorizedLayer, ...]
    kept: tuple[KeptLayer, ...]

    def __str__(self) -> str:
        lines = [f"factorized {len(self.factorized)} layers:"]
        lines += [f"  {f.name:<32} {f.kind:<8} kernel {f.kernel_shape} rank {f.rank}" for f in self.factorized]
        lines.append(f"kept whole {len(self.kept)} weighted layers:")
        lines += [f"  {k.name:<32} {k.kind:<20} {k.reason}" for k in self.kept]
        return "\n".join(lines)


def plan_factorization(
    model: tf.keras.Model,
    *,
    skip_first_conv: bool = True,
    skip_pointwise: bool = True,
    skip_classifier: bool = True,
    min_rank: int = 4,
    only: Iterable[str] | None = None,
    attention: bool = False,
) -> FactorizationReport:
    """Decide which layers `factorize` would replace, without touching the model (docs/algorithm.md §1 rules)."""
    _check_graph_model(model)
    only = set(only) if only is not None else None
    classifiers = _output_dense_layers(model) if skip_classifier else set()
    first_conv = next((layer.name for layer in walk_layers(model)
                       if (kind := kinds.kind_of(layer)) and kind.is_conv and type(layer) is kind.source), None)
    rules = kinds.Rules(first_conv if skip_first_conv else None, frozenset(classifiers), skip_pointwise, attention)
    factorized, kept = [], []
    for layer in walk_layers(model):
        if not layer.weights:
            continue
        kind = type(layer).__name__
        reason = _ineligibility(layer, rules)
        if reason is None:
            layer_kind = kinds.kind_of(layer)
            shapes, ranks = layer_kind.kernel_shapes(layer), layer_kind.full_ranks(layer)
            if only is not None and layer.name not in only:
                reason = "not in the requested layer list"
            elif min(ranks.values()) < min_rank:
                reason = f"rank {min(ranks.values())} below min_rank {min_rank}"
            else:
                factorized += [FactorizedLayer(kinds.group_name(layer.name, pair), kind, shapes[pair], ranks[pair],
                                               layer.name) for pair in layer_kind.pairs]
                continue
        kept.append(KeptLayer(layer.name, kind, reason))
    if only is not None:
        missing = only - {f.layer for f in factorized} - {k.name for k in kept}
        if missing:
            raise ValueError(f"factorize: no layer named {sorted(missing)} in model '{model.name}'")
    return FactorizationReport(tuple(factorized), tuple(kept))


def factorize(
    model: tf.keras.Model,
    *,
    skip_first_conv: bool = True,
    skip_pointwise: bool = True,
    skip_classifier: bool = True,
    min_rank: int = 4,
    only: Iterable[str] | None = None,
    attention: bool = False,
) -> tf.keras.Model:
    """Return a copy of ``model`` whose eligible layers hold principal kernels (docs/algorithm.md §1).

    Args:
      model: a built functional or Sequential ``tf.keras.Model`` (nested models are descended into).
      skip_first_conv: keep the first Conv2D (it sees the raw image) whole.
      skip_pointwise: keep 1×1 convs (e.g. ResNet shortcuts) whole.
      skip_classifier: keep Dense layers that produce a model output whole.
      min_rank: keep layers whose full rank ``min(rows, Cout)`` is below this whole.
      only: if given, factorize only these layer names (still subject to eligibility).
      attention: also factorize ``MultiHeadAttention``'s query, key, value and output projections (the PriSM
        authors keep a DeiT's attention whole: off by default).

    Returns:
      The factorized model, numerically equal to ``model`` at full rank (float32 relative error ~1e-6). Its
      ``prism_report`` attribute is a `FactorizationReport` listing what was factorized and what was kept whole.

    Raises:
      ValueError: the model is subclassed or unbuilt, or it has no factorizable layer.
    """
    report = plan_factorization(
        model, skip_first_conv=skip_first_conv, skip_pointwise=skip_pointwise,
        skip_classifier=skip_classifier, min_rank=min_rank, only=only, attention=attention,
    )
    if not report.factorized:
        hints = []
        if skip_pointwise and any(k.reason == "1x1 conv" for k in report.kept):
            hints.append("its 1x1 convs (where a MobileNet-style model keeps nearly all its weights) are kept whole "
                         "by skip_pointwise=True: pass skip_pointwise=False to factorize them")
        if skip_first_conv and any("first conv" in k.reason for k in report.kept):
            hints.append("skip_first_conv=False factorizes the first conv too")
        raise ValueError(
            f"factorize: model '{model.name}' has no factorizable layer (Conv2D with k>1 or hidden Dense of rank "
            f">= {min_rank})" + "".join(f"; {h}" for h in hints) + f".\n{report}"
        )
    ranks = {f.name: f.rank for f in report.factorized}
    clone = clone_with_ranks(model, ranks)
    originals = {layer.name: layer for layer in walk_layers(model)}
    factorized = {f.layer for f in report.factorized}
    for layer in walk_layers(clone):
        source = originals[layer.name]
        if layer.name in factorized:
            kinds.kind_of(source).load_factors(layer, source)
        else:
            layer.set_weights(source.get_weights())
    clone.prism_report = report
    return clone


def clone_with_ranks(
    model: tf.keras.Model, ranks: dict[str, int], widths: dict[str, int] | None = None
) -> tf.keras.Model:
    """Clone ``model``'s architecture (fresh weights) with the named kernel groups at given ranks.

    ``ranks`` is by kernel group (`prism_tf.kinds.group_name`: the layer's name, or ``layer/pair`` for each pair of a
    layer with several kernels). Named layers may be plain layers of a registered kind (they become principal
    layers) or principal layers (their ranks change). ``widths`` sets the output channels (``filters``/``units``) of
    named conv/dense/principal layers, for width-sliced sub-models. This is how full factorized models and every
    sub-model are built.
    """
    _check_graph_model(model)
    widths = widths or {}

    def clone_layer(layer: tf.keras.layers.Layer) -> tf.keras.layers.Layer:
        if isinstance(layer, tf.keras.Model):
            return tf.keras.models.clone_model(layer, clone_function=clone_layer)
        config = layer.get_config()
        if layer.name in widths:
            config[kinds.kind_of(layer).width_key] = widths[layer.name]
        layer = layer.__class__.from_config(config)
        kind = kinds.kind_of(layer)
        layer_ranks = kinds.pair_ranks(layer.name, kind.pairs, ranks) if kind is not None else None
        if layer_ranks is not None:
            return _principal_from(layer, layer_ranks)
        return layer

    clone = tf.keras.models.clone_model(model, clone_function=clone_layer)
    grouped = {g for g in kinds.kernel_groups(clone)}
    for group in ranks:
        if group not in grouped:
            raise ValueError(f"kernel group '{group}' names no layer of '{model.name}' that can hold principal "
                             "kernels")
    return clone


def refactorize(model: tf.keras.Model) -> tf.keras.Model:
    """Rebuild every principal layer's kernel ``W = A diag(ω) B`` and re-run its SVD, in place (docs/algorithm.md §1,
    §3).

    The model's function is unchanged (up to float rounding); its principal kernels are orthogonal again, their
    singular values current, and ``ω`` reset to ones. Returns ``model`` for chaining.
    """
    layers = principal_layers(model)
    if not layers:
        raise ValueError(f"refactorize: model '{model.name}' has no principal-kernel layer")
    for layer in layers:
        for pair in layer.pairs:
            f = layer.factors(pair)
            a, b, s = spectral.refactorize(f.principal, f.combination, f.scale)
            layer.set_pair_factors(pair, a, b, s)
    return model


def _principal_from(layer: tf.keras.layers.Layer, ranks: dict[str, int]) -> tf.keras.layers.Layer:
    config = layer.get_config()
    if is_principal(layer):
        return type(layer).from_config(type(layer).config_with_ranks(config, ranks))
    return kinds.kind_of(layer).to_principal(config, ranks)


def _ineligibility(layer: tf.keras.layers.Layer, rules: kinds.Rules) -> str | None:
    if is_principal(layer):
        return "already factorized"
    kind = kinds.kind_of(layer)
    if kind is None:
        whole = kinds.covering_kind(layer)
        if whole is not None and not isinstance(whole, kinds.LayerKind):
            return whole.why
        return f"not a {'/'.join(k.source.__name__ for k in kinds.KINDS)} (normalization, ...)"
    return kind.ineligibility(layer, rules)


def _output_dense_layers(model: tf.keras.Model) -> set[str]:
    found = set()
    for tensor in tf.nest.flatten(model.outputs):
        layer = tensor._keras_history.layer
        while isinstance(layer, _PASS_THROUGH) and layer._inbound_nodes:
            layer = layer._inbound_nodes[0].inbound_layers
        if isinstance(layer, tf.keras.Model):
            found |= _output_dense_layers(layer)
        elif (kind := kinds.kind_of(layer)) and kind.is_classifier and type(layer) is kind.source:
            found.add(layer.name)
    return found


def _check_graph_model(model: tf.keras.Model) -> None:
    if not isinstance(model, tf.keras.Model):
        raise ValueError(f"expected a tf.keras.Model, got {type(model).__name__}")
    if not model.built or not getattr(model, "_is_graph_network", False) and not isinstance(
        model, tf.keras.Sequential
    ):
        raise ValueError(
            f"model '{model.name}' must be a built functional or Sequential Keras model "
            "(subclassed models cannot be cloned; build Sequential models with an input shape)"
        )
    if isinstance(model, tf.keras.Sequential) and not model.inputs:
        raise ValueError(f"Sequential model '{model.name}' has no known input shape: build it first")


def unfactorize(model: tf.keras.Model, only: Iterable[str] | None = None) -> tf.keras.Model:
    """A plain Keras copy of ``model``: every principal layer back to a ``Conv2D``/``Dense`` with ``W = A·diag(ω)·B``.

    What a user deploys or evaluates without prism-tf: the result has only built-in Keras layers and the same
    function as ``model`` (up to float rounding). Other layers, BatchNorm statistics included, are copied.
    ``only``: un-factorize just these principal layers (by name) and copy the others as they are
    (`prism_tf.truncation` writes each layer in its smaller form).
    """
    _check_graph_model(model)
    if only is not None:
        only = set(only)
        missing = only - {layer.name for layer in principal_layers(model)}
        if missing:
            raise ValueError(f"unfactorize: no principal layer named {sorted(missing)} in model '{model.name}'")
    chosen = (lambda layer: is_principal(layer)) if only is None else (
        lambda layer: is_principal(layer) and layer.name in only)

    def clone_layer(layer: tf.keras.layers.Layer) -> tf.keras.layers.Layer:
        if isinstance(layer, tf.keras.Model):
            return tf.keras.models.clone_model(layer, clone_function=clone_layer)
        if not chosen(layer):
            return layer.__class__.from_config(layer.get_config())
        return kinds.kind_of(layer).to_plain(layer)

    plain = tf.keras.models.clone_model(model, clone_function=clone_layer)
    sources = {layer.name: layer for layer in walk_layers(model)}
    for layer in walk_layers(plain):
        source = sources[layer.name]
        if chosen(source):
            layer.set_weights(kinds.kind_of(source).plain_weights(source))
        elif source.weights:
            layer.set_weights(source.get_weights())
    return plain
