"""Training precision: float32, or Keras's ``mixed_bfloat16`` with float32 master weights (docs/algorithm.md §7,
"Precision").

Under ``mixed_bfloat16`` a layer keeps its variables in float32 and computes in bfloat16: Keras casts each variable
to bfloat16 when the layer reads it inside ``call`` (``AutoCastVariable``), and gradients flow back to the float32
variable. Everything else stays float32: the weights a client receives and uploads, the server's aggregation,
SVD and re-factorization, evaluation and the deployed model, and the logits, cast to float32 before the loss.
Keras's BatchNormalization and LayerNormalization take bfloat16 inputs but compute their means and variances in
float32 themselves; GroupNormalization does not, so it keeps the float32 policy (`FLOAT32_LAYERS`). Keeping
BatchNorm float32 as well was measured to cost most of the gain (a ResNet-18 step at width 64: 0.61x of float32
with float32 BatchNorm, 0.40x with Keras's mixed BatchNorm; `bench/speed.py`, section ``precision``).

CPUs with AMX-BF16 or AVX512-BF16 have native bfloat16 matrix units (`cpu_has_bf16`); elsewhere bfloat16 is
emulated and slower, so ``auto`` resolves to ``mixed_bfloat16`` only where the CPU has them (`resolve`).

Plain NumPy/JSON and Keras: no TFF here.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import tensorflow as tf

PRECISIONS = ("float32", "mixed_bfloat16", "auto")
"""The values of ``--precision``: ``auto`` is ``mixed_bfloat16`` where `cpu_has_bf16`, else ``float32``."""

FLOAT32_LAYERS = frozenset({"InputLayer", "GroupNormalization"})
"""Layer classes that keep the ``float32`` policy under ``mixed_bfloat16``: the inputs, and GroupNorm, whose Keras
implementation would compute its statistics in bfloat16."""

BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=1)
def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has native bfloat16 arithmetic (the ``amx_bf16`` or ``avx512_bf16`` flag of Linux's
    ``/proc/cpuinfo``); ``False`` where that file cannot be read (other systems)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return any(flag in flags for flag in BF16_FLAGS)


def check_precision(precision: str, what: str = "--precision") -> None:
    """Raise `ValueError` naming ``what`` unless ``precision`` is one of `PRECISIONS`."""
    if precision not in PRECISIONS:
        raise ValueError(f"{what} must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def resolve(precision: str) -> str:
    """``float32`` or ``mixed_bfloat16``: ``auto`` becomes ``mixed_bfloat16`` where `cpu_has_bf16`."""
    check_precision(precision)
    if precision == "auto":
        return "mixed_bfloat16" if cpu_has_bf16() else "float32"
    return precision


def with_policy(model_json: str, precision: str) -> str:
    """A Keras model's JSON (``model.to_json()``) with every layer's dtype policy set to ``precision``, except the
    `FLOAT32_LAYERS`, which stay float32. ``float32`` returns the JSON unchanged.

    Works on nested models (a layer whose config holds ``layers``) too.
    """
    precision = resolve(precision)
    if precision == "float32":
        return model_json
    config = json.loads(model_json)
    _set_policy(config, precision)
    return json.dumps(config)


def _set_policy(node: Any, precision: str) -> None:
    if isinstance(node, list):
        for item in node:
            _set_policy(item, precision)
        return
    if not isinstance(node, dict):
        return
    config = node.get("config")
    if "class_name" in node and isinstance(config, dict):
        if "dtype" in config and node["class_name"] not in FLOAT32_LAYERS:
            config["dtype"] = precision
        _set_policy(config.get("layers", []), precision)
        return
    for value in node.values():
        _set_policy(value, precision)


def with_precision(model: tf.keras.Model, precision: str, custom_objects: dict | None = None) -> tf.keras.Model:
    """A copy of ``model`` computing at ``precision`` (`with_policy`), with ``model``'s weights (float32 masters);
    ``model`` itself for ``float32``."""
    if resolve(precision) == "float32":
        return model
    import prism_tf  # the package's custom layers (principal kinds) for deserialization

    objects = {**prism_tf.CUSTOM_OBJECTS, **(custom_objects or {})}
    copy = tf.keras.models.model_from_json(with_policy(model.to_json(), precision), custom_objects=objects)
    copy.set_weights(model.get_weights())
    return copy


def float32_logits(logits: tf.Tensor) -> tf.Tensor:
    """``logits`` as float32 (the loss and the metrics are computed in float32 at every precision)."""
    return tf.cast(logits, tf.float32)


__all__ = ["BF16_FLAGS", "FLOAT32_LAYERS", "PRECISIONS", "check_precision", "cpu_has_bf16", "float32_logits",
           "resolve", "with_policy", "with_precision"]
