"""`python -m export model`: the trained global model as Keras, SavedModel and TFLite (float and int8).

Each export is checked by an independent path: the written file is loaded afresh (Keras, TensorFlow, LiteRT) and
scored on the run's test images, and the numbers must equal what the exporter reported; the raw-pixel model must
agree with the run's own evaluation of the same weights.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

import prism_tf
from export import cli
from export.model import deployable_model, export_model, tflite_accuracy
from prism_tf.federated.data import load_dataset
from prism_tf.federated.replay import RoundReplay


@pytest.fixture(scope="module")
def test_images(tiny_run):
    replay = RoundReplay(tiny_run)
    dataset = load_dataset(replay.config.dataset, progress=False)
    return replay, dataset


def test_keras_export_is_the_evaluated_model_with_preprocessing_built_in(tiny_run, tmp_path, test_images):
    replay, dataset = test_images
    report = export_model(tiny_run, tmp_path / "model.keras", fmt="keras", eval_examples=None)
    model = tf.keras.models.load_model(tmp_path / "model.keras", custom_objects=prism_tf.CUSTOM_OBJECTS)
    assert not prism_tf.kinds.principal_layers(model.layers[-1])  # un-factorized: plain Conv2D/Dense
    logits = model.predict(dataset.x_test.astype(np.float32), verbose=0)
    assert float(np.mean(np.argmax(logits, -1) == dataset.y_test)) == pytest.approx(report.keras_accuracy)
    assert report.exported_accuracy == pytest.approx(report.keras_accuracy)
    # The same weights without the built-in preprocessing, fed the run's preprocessed images: the same logits.
    plain = deployable_model(replay, x_train=dataset.x_train, preprocessing=False)
    np.testing.assert_allclose(plain.predict(replay.preprocess(dataset.x_test), verbose=0), logits, atol=1e-4)
    recorded = json.loads((tmp_path / "model.keras.export.json").read_text())
    assert recorded["bytes"] == (tmp_path / "model.keras").stat().st_size


@pytest.mark.slow  # two conversions and a quantization calibration: ~35 s
def test_tflite_float_and_int8_are_scored_in_litert(tiny_run, tmp_path, test_images):
    _, dataset = test_images
    x, y = dataset.x_test.astype(np.float32), dataset.y_test
    plain = export_model(tiny_run, tmp_path / "m.tflite", fmt="tflite", eval_examples=None)
    assert plain.exported_accuracy == pytest.approx(plain.keras_accuracy, abs=1 / len(y))
    assert tflite_accuracy((tmp_path / "m.tflite").read_bytes(), x, y) == pytest.approx(plain.exported_accuracy)
    quantized = export_model(tiny_run, tmp_path / "m8.tflite", fmt="tflite", int8=True, representative=32,
                             eval_examples=None)
    assert quantized.bytes < 0.5 * plain.bytes
    assert quantized.float_tflite_accuracy == pytest.approx(plain.exported_accuracy)
    assert tflite_accuracy((tmp_path / "m8.tflite").read_bytes(), x, y) == pytest.approx(quantized.exported_accuracy)


def test_savedmodel_export_serves(tiny_run, tmp_path, test_images):
    _, dataset = test_images
    report = export_model(tiny_run, tmp_path / "saved", fmt="savedmodel", eval_examples=0)
    loaded = tf.saved_model.load(str(tmp_path / "saved"))
    logits = loaded.signatures["serving_default"](tf.constant(dataset.x_test[:4].astype(np.float32)))
    assert next(iter(logits.values())).shape == (4, 3)
    assert report.bytes > 0


@pytest.mark.parametrize("argv, message", [
    (["--format", "onnx"], "invalid choice"),
    (["--format", "keras", "--int8"], "--int8 applies to --format tflite only"),
    (["--format", "keras", "--out-suffix", ".h5"], "must end in .keras"),
    (["--round", "99"], "no checkpoint of round 99"),
])
def test_bad_requests_get_one_clear_message(tiny_run, tmp_path, capsys, argv, message):
    out = str(tmp_path / "m.keras")
    if "--out-suffix" in argv:
        out, argv = str(tmp_path / "m.h5"), argv[:2]
    try:
        code = cli.main(["model", "--run", str(tiny_run), "--out", out, *argv])
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err
