"""The trained global model as a user takes it away: Keras, SavedModel or TFLite (float or int8).

docs/export.md, "The global model". The model is the run's deployed model (`prism_tf.federated.methods.deployed_models`)
at a kept checkpoint, un-factorized back to plain Conv2D/Dense (`prism_tf.unfactorize`) unless ``factorized``, or
cut to a rank share or energy with each layer in its smaller form (`prism_tf.truncation`, ``rank_keep``/``energy``),
with the BatchNorm statistics the run evaluated with (recalibrated on the run's calibration batches for
``--eval-norm recalibrate``), and the run's input preprocessing built in: the exported model takes raw pixels
(0..255, float32) and normalizes them itself, so an app feeds it camera pixels as they are.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

import prism_tf
from export.files import write_atomic
from prism_tf import evaluation, truncation
from prism_tf.federated.data import load_dataset
from prism_tf.federated.replay import RoundReplay

FORMATS = ("keras", "savedmodel", "tflite")


@dataclasses.dataclass
class ModelExport:
    """What `export_model` wrote and measured."""

    path: str
    format: str
    bytes: int
    round: int
    int8: bool
    keras_accuracy: float | None = None
    exported_accuracy: float | None = None
    float_tflite_bytes: int | None = None
    float_tflite_accuracy: float | None = None
    test_examples: int = 0
    rank_keep: float | None = None
    energy: float | None = None
    truncation: dict | None = None  # `prism_tf.truncation.TruncationReport.to_dict()`
    truncation_table: str | None = None
    params: int | None = None  # `prism_tf.cost` of the deployed model (without the built-in preprocessing)
    flops: int | None = None
    qat_steps: int | None = None  # quantization-aware fine-tuning (`prism_tf.compression.qat`), ``--qat``
    qat_learning_rate: float | None = None
    qat_first_loss: float | None = None  # distillation loss before the first step
    qat_last_loss: float | None = None  # mean over the last tenth of the steps
    qat_seconds: float | None = None
    qat_keras_accuracy: float | None = None  # the fake-quantized Keras model's test accuracy

    def report(self) -> str:
        lines = [f"wrote {self.path} ({self.format}{', int8' if self.int8 else ''}, {self.bytes:,} bytes) from "
                 f"the server model after round {self.round}"]
        if self.truncation_table:
            lines.append(self.truncation_table)
        if self.keras_accuracy is not None:
            lines.append(f"test accuracy on {self.test_examples} images: Keras {self.keras_accuracy:.4f}")
        if self.qat_steps is not None:
            lines.append(f"quantization-aware fine-tuning: {self.qat_steps} steps ({self.qat_seconds:.0f} s), "
                         f"distillation loss {self.qat_first_loss:.5f} -> {self.qat_last_loss:.5f}")
            if self.qat_keras_accuracy is not None:
                lines.append(f"  fake-quantized Keras model: {self.qat_keras_accuracy:.4f}")
        if self.float_tflite_accuracy is not None:
            lines.append(f"  TFLite float32 ({self.float_tflite_bytes:,} bytes): {self.float_tflite_accuracy:.4f}")
        if self.exported_accuracy is not None and self.format == "tflite":
            drop = 100 * (self.keras_accuracy - self.exported_accuracy)
            lines.append(f"  this file in a TFLite interpreter: {self.exported_accuracy:.4f} ({drop:+.2f} pp below "
                         "Keras)" if drop >= 0 else f"  this file: {self.exported_accuracy:.4f}")
        return "\n".join(lines)


def deployable_model(replay: RoundReplay, *, factorized: bool = False, x_train: np.ndarray | None = None,
                     preprocessing: bool = True, rank_keep: float | None = None, energy: float | None = None,
                     criterion: str = "params") -> tf.keras.Model:
    """The run's deployed model at ``replay``'s server weights, ready to save (see the module docstring).

    ``x_train``: the training images the run recalibrates BatchNorm on (needed for ``--eval-norm recalibrate``).
    ``rank_keep`` or ``energy``: truncate every principal layer (`prism_tf.truncation.truncate`; each layer in its
    smaller form by ``criterion``, or every one factorized with ``factorized``). A run whose deployed model is not
    factorized (FedAvg, HeteroFL, ...) is factorized first (`prism_tf.factorize` with the run's options: the SVD of
    each eligible kernel, exact), so it is truncated the same way. BatchNorm is recalibrated after truncation. The
    returned model's ``prism_truncation`` is the `TruncationReport` (``None`` without truncation), its
    ``prism_cost`` `prism_tf.cost` of the model without the preprocessing layers.
    """
    model = replay.deployed_model()
    report = None
    if rank_keep is not None or energy is not None:
        if not prism_tf.kinds.principal_layers(model):
            model = prism_tf.factorize(model, **replay.config.factorize_options())
        model, report = truncation.truncate(model, rank_keep=rank_keep, energy=energy, criterion=criterion,
                                            form="factorized" if factorized else "smaller")
    elif not factorized:
        model = prism_tf.unfactorize(model)
    if replay.config.eval_norm == "recalibrate" and evaluation.batch_norm_layers(model):
        if x_train is None:
            raise ValueError("this run recalibrates BatchNorm before evaluation: pass its training images")
        evaluation.recalibrate_batchnorm(model, replay.calibration(x_train))
    model_cost = prism_tf.cost(model)
    if preprocessing:
        model = with_preprocessing(model, replay)
    model.prism_truncation, model.prism_cost = report, model_cost
    return model


def with_preprocessing(model: tf.keras.Model, replay: RoundReplay) -> tf.keras.Model:
    """``model`` behind the run's input preprocessing: a model that takes raw pixels (0..255, float32), scales them
    to 0..1 and normalizes them with the run's per-channel statistics (if it normalizes)."""
    mean, std = replay.input_stats()
    raw = tf.keras.Input(shape=model.inputs[0].shape[1:], name="pixels")
    x = tf.keras.layers.Rescaling(1.0 / 255.0, name="scale_pixels")(raw)
    if mean is not None:
        x = tf.keras.layers.Normalization(mean=mean, variance=np.square(std), name="normalize_channels")(x)
    return tf.keras.Model(raw, model(x), name=f"{model.name}_deployed")


def to_tflite(model: tf.keras.Model, *, int8: bool = False, representative: np.ndarray | None = None) -> bytes:
    """Convert an inference model to TFLite (builtin ops only); ``int8``: post-training full-integer quantization
    of weights and activations, calibrated on ``representative`` raw images (inputs and outputs stay float32)."""
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if int8:
        if representative is None or len(representative) == 0:
            raise ValueError("int8 quantization needs representative images (--representative N, N >= 1)")
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        images = np.asarray(representative, np.float32)
        converter.representative_dataset = lambda: ([images[i:i + 1]] for i in range(len(images)))
    return converter.convert()


def tflite_accuracy(flatbuffer: bytes, x: np.ndarray, y: np.ndarray, batch_size: int = 250, *,
                    interpreter_class: Any = None) -> float:
    """Top-1 accuracy of a TFLite classifier on raw images ``x`` in LiteRT's interpreter (as a phone runs it), or in
    ``interpreter_class`` (e.g. ``tf.lite.Interpreter``, an independent runtime for a second opinion)."""
    if interpreter_class is None:
        from ai_edge_litert.interpreter import Interpreter as interpreter_class

    interpreter = interpreter_class(model_content=flatbuffer)
    detail = interpreter.get_input_details()[0]
    correct = 0
    for start in range(0, len(x), batch_size):
        batch = np.asarray(x[start:start + batch_size], np.float32)
        interpreter.resize_tensor_input(detail["index"], batch.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(detail["index"], batch)
        interpreter.invoke()
        logits = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
        correct += int(np.sum(np.argmax(logits, axis=-1) == y[start:start + batch_size]))
    return correct / len(x)


def export_model(
    run_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    fmt: str = "keras",
    round_num: int | None = None,
    factorized: bool = False,
    int8: bool = False,
    representative: int = 200,
    eval_examples: int | None = 2000,
    seed: int = 0,
    rank_keep: float | None = None,
    energy: float | None = None,
    criterion: str = "params",
    qat: int | None = None,
    qat_learning_rate: float = 1e-4,
    log: Callable[[str], None] | None = None,
) -> ModelExport:
    """Write the run's deployed model after round ``round_num`` (default: the latest checkpoint) to ``out``.

    Measures test accuracy of the Keras model and, for TFLite, of the written file in LiteRT's interpreter (and of
    the float32 conversion beside an int8 one), on ``eval_examples`` test images in a seeded random order
    (``None``: all; 0: skip).

    ``rank_keep`` (``--rank-keep``) or ``energy`` (``--energy``): a rank-truncated model (`deployable_model`,
    docs/export.md "Picking a rank"), its per-layer report in ``truncation``; ``criterion``: ``params`` or ``flops``,
    what decides each layer's form.

    ``qat`` (``--qat STEPS``, with ``int8``): before the full-integer conversion, fine-tune the model with tfmot's
    quantization-aware training for ``qat`` Adam steps at ``qat_learning_rate``, distilling the float model on the
    run's calibration images (`prism_tf.compression.qat`); ``log`` gets its progress lines.

    Raises:
      ValueError: an unknown format, ``int8`` without TFLite, both ``rank_keep`` and ``energy`` or one outside
        (0, 1], an unknown ``criterion``, a model with no layer to factorize; ``qat`` without ``int8`` or below 1,
        a model with a layer tfmot cannot quantize (named).
      prism_tf.federated.rundir.RunError: no such run or checkpoint.
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if int8 and fmt != "tflite":
        raise ValueError("--int8 applies to --format tflite only")
    if fmt == "keras" and not str(out).endswith(".keras"):
        raise ValueError(f"--format keras writes a .keras file: --out must end in .keras, got {str(out)!r}")
    check_truncation(rank_keep, energy, criterion)
    check_qat(qat, int8, qat_learning_rate)
    replay = RoundReplay(run_dir, None if round_num is None else int(round_num) + 1)
    dataset = load_dataset(replay.config.dataset, data=replay.config.data, progress=False)
    inner = deployable_model(replay, factorized=factorized, x_train=dataset.x_train, rank_keep=rank_keep,
                             energy=energy, criterion=criterion, preprocessing=False)
    model = with_preprocessing(inner, replay)
    model.prism_truncation, model.prism_cost = inner.prism_truncation, inner.prism_cost
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = ModelExport(str(out), fmt, 0, replay.round_num - 1, int8, rank_keep=rank_keep, energy=energy,
                         params=model.prism_cost["params"], flops=model.prism_cost["flops"])
    if model.prism_truncation is not None:
        report.truncation = model.prism_truncation.to_dict()
        report.truncation_table = str(model.prism_truncation)
    n = len(dataset.x_test) if eval_examples is None else min(int(eval_examples), len(dataset.x_test))
    order = np.random.default_rng([seed, 11]).permutation(len(dataset.x_test))[:n]
    x_test, y_test = dataset.x_test[order].astype(np.float32), dataset.y_test[order]
    if n:
        report.keras_accuracy = float(np.mean(np.argmax(model.predict(x_test, batch_size=250, verbose=0), -1)
                                              == y_test))
        report.test_examples = n
    if fmt == "tflite":
        rng = np.random.default_rng([seed, 13])
        reps = dataset.x_train[rng.permutation(len(dataset.x_train))[:representative]].astype(np.float32)
        converted = model
        if qat is not None:
            from prism_tf.compression.qat import quantization_aware_finetune

            tuned = quantization_aware_finetune(inner, replay.calibration(dataset.x_train), int(qat),
                                                learning_rate=qat_learning_rate, seed=seed, log=log)
            converted = with_preprocessing(tuned.model, replay)
            report.qat_steps, report.qat_learning_rate = tuned.steps, float(qat_learning_rate)
            report.qat_first_loss, report.qat_last_loss = tuned.first_loss, tuned.last_loss
            report.qat_seconds = tuned.seconds
            if n:
                report.qat_keras_accuracy = float(np.mean(
                    np.argmax(converted.predict(x_test, batch_size=250, verbose=0), -1) == y_test))
        flatbuffer = to_tflite(converted, int8=int8, representative=reps)
        write_atomic(out, flatbuffer)
        if n:
            report.exported_accuracy = tflite_accuracy(flatbuffer, x_test, y_test)
            if int8:
                plain = to_tflite(model)
                report.float_tflite_bytes = len(plain)
                report.float_tflite_accuracy = tflite_accuracy(plain, x_test, y_test)
    else:
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
        try:
            target = tmp / (out.name if fmt == "keras" else "model")
            if fmt == "keras":
                model.save(target)
            else:
                tf.saved_model.save(model, str(target))
            if out.exists():
                shutil.rmtree(out) if out.is_dir() else out.unlink()
            os.replace(target, out)
        except OSError as e:  # a full or read-only disk: Keras' zip writer names neither the file nor the cause
            raise OSError(e.errno, f"cannot write {out}: {e.strerror or e}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if n and fmt == "keras":
            reloaded = tf.keras.models.load_model(out, custom_objects=prism_tf.CUSTOM_OBJECTS)
            report.exported_accuracy = float(np.mean(
                np.argmax(reloaded.predict(x_test, batch_size=250, verbose=0), -1) == y_test))
    report.bytes = _size(out)
    (out.parent / f"{out.name}.export.json").write_text(json.dumps(dataclasses.asdict(report), indent=2))
    return report


def check_truncation(rank_keep: float | None, energy: float | None, criterion: str = "params") -> None:
    """Refuse a truncation request `export_model` cannot serve, naming the command-line flags."""
    if rank_keep is not None and energy is not None:
        raise ValueError("--rank-keep and --energy are two rules for the same choice: give one")
    for flag, value in (("--rank-keep", rank_keep), ("--energy", energy)):
        if value is not None and not (isinstance(value, int | float) and 0.0 < float(value) <= 1.0):
            raise ValueError(f"{flag} must be in (0, 1], got {value!r}")
    if criterion not in truncation.CRITERIA:
        raise ValueError(f"--by must be one of {', '.join(truncation.CRITERIA)}, got {criterion!r}")


def check_qat(qat: int | None, int8: bool, learning_rate: float = 1e-4) -> None:
    """Refuse a quantization-aware fine-tuning request `export_model` cannot serve, naming the flags."""
    if qat is None:
        return
    if isinstance(qat, bool) or not isinstance(qat, int | np.integer) or qat < 1:
        raise ValueError(f"--qat must be a number of steps >= 1, got {qat!r}")
    if not int8:
        raise ValueError("--qat fine-tunes for the full-integer model: add --int8 (with --format tflite)")
    if not (isinstance(learning_rate, int | float) and 0.0 < float(learning_rate) < float("inf")):
        raise ValueError(f"--qat-lr must be a positive number, got {learning_rate!r}")


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


__all__ = ["FORMATS", "ModelExport", "check_qat", "check_truncation", "deployable_model", "export_model",
           "tflite_accuracy", "to_tflite", "with_preprocessing"]
