"""`python -m export model`: the trained global model as Keras, SavedModel and TFLite (float and int8).

Each export is checked by an independent path: the written file is loaded afresh (Keras, TensorFlow, LiteRT) and
scored on the run's test images, and the numbers must equal what the exporter reported; the raw-pixel model must
agree with the run's own evaluation of the same weights.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import prism_tf
from export import cli
from export.model import deployable_model, export_model, tflite_accuracy, to_tflite
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


@pytest.mark.parametrize("argv, message", [
    (["--rank-keep", "0"], "--rank-keep must be in (0, 1], got 0.0"),
    (["--energy", "1.5"], "--energy must be in (0, 1], got 1.5"),
    (["--rank-keep", "0.5", "--energy", "0.9"], "not allowed with argument"),
])
def test_bad_truncation_requests_get_one_clear_message(tiny_run, tmp_path, capsys, argv, message):
    try:
        code = cli.main(["model", "--run", str(tiny_run), "--out", str(tmp_path / "m.keras"), *argv])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_truncated_export_writes_the_reported_model(tiny_run, tmp_path, capsys):
    out = tmp_path / "t.keras"
    assert cli.main(["model", "--run", str(tiny_run), "--out", str(out), "--energy", "0.5",
                     "--eval-examples", "24"]) == 0
    printed = capsys.readouterr().out
    recorded = json.loads((tmp_path / "t.keras.export.json").read_text())
    table = recorded["truncation"]
    assert recorded["energy"] == 0.5 and table["energy"] == 0.5 and recorded["truncation_table"] in printed
    layers = {entry["name"]: entry for entry in table["layers"]}
    assert layers and all(g["energy"] >= 0.5 - 1e-6 for e in layers.values() for g in e["groups"])
    assert {e["form"] for e in layers.values()} <= {"factorized", "plain"}
    loaded = tf.keras.models.load_model(out, custom_objects=prism_tf.CUSTOM_OBJECTS)
    inner = loaded.layers[-1]  # the run's model behind the built-in preprocessing
    cost = prism_tf.cost(inner)
    assert (cost["params"], cost["flops"]) == (table["params"], table["flops"])
    for layer in prism_tf.kinds.walk_layers(inner):
        if layer.name in layers:
            assert prism_tf.kinds.is_principal(layer) == (layers[layer.name]["form"] == "factorized")
    assert table["params"] < table["source_params"]


def test_a_run_trained_whole_is_factorized_then_truncated():
    """FedAvg (or any method whose deployed model is plain): SVD of each eligible kernel, then the same cut."""
    plain = prism_tf.models.resnet18(width=4, num_classes=3)
    replay = types.SimpleNamespace(deployed_model=lambda: plain, input_stats=lambda: (None, None),
                                   config=types.SimpleNamespace(eval_norm="moving", factorize_options=lambda: {}))
    x = np.random.default_rng(0).uniform(0, 255, size=(2, 32, 32, 3)).astype(np.float32)
    full = deployable_model(replay, rank_keep=1.0, preprocessing=False)
    np.testing.assert_allclose(full(x / 255.0, training=False), plain(x / 255.0, training=False), atol=1e-5)
    cut = deployable_model(replay, rank_keep=0.25)
    report = cut.prism_truncation
    assert report is not None and full.prism_truncation.rank_keep == 1.0
    assert [e.name for e in report.layers] == [f.name for f in prism_tf.plan_factorization(plain).factorized]
    assert report.params < prism_tf.cost(plain)["params"]
    assert cut(x).shape == (2, 3)


@pytest.mark.slow  # two conversions and a calibration: 20-50 s
def test_a_truncated_factorized_model_converts_to_float_and_int8_tflite():
    from prism_tf import truncation

    tf.keras.utils.set_random_seed(0)
    model = prism_tf.refactorize(prism_tf.factorize(prism_tf.models.resnet18(width=4, num_classes=3)))
    cut, report = truncation.truncate(model, rank_keep=0.25)
    assert {entry.form for entry in report.layers} == {"factorized"}
    x = np.random.default_rng(0).uniform(size=(8, 32, 32, 3)).astype(np.float32)
    y = np.argmax(cut.predict(x, verbose=0), -1)
    plain, quantized = to_tflite(cut), to_tflite(cut, int8=True, representative=x)
    assert len(quantized) < 0.8 * len(plain)
    assert tflite_accuracy(plain, x, y) == 1.0 and tflite_accuracy(quantized, x, y) >= 0.75


def test_litert_latency_of_a_tiny_model():
    from export.sweep import tflite_latency

    model = tf.keras.Sequential([tf.keras.Input((6,)), tf.keras.layers.Dense(3)])
    flatbuffer = to_tflite(model)
    seconds = {b: tflite_latency(flatbuffer, np.ones(6, np.float32), b, repeats=3, warmup=1) for b in (1, 32)}
    assert all(0 < s < 1 for s in seconds.values())
    with pytest.raises(ValueError, match="batch_size"):
        tflite_latency(flatbuffer, np.ones(6, np.float32), 0)


@pytest.mark.slow  # three TFLite exports of the tiny run: 1-2 min
def test_truncation_sweep_rows_are_the_written_files(tiny_run, tmp_path):
    from export.sweep import truncation_sweep

    rows = truncation_sweep(tiny_run, tmp_path, energies=(0.5,), rank_keeps=(0.25,), eval_examples=24,
                            repeats=2)
    assert [(r.rule, r.value) for r in rows] == [("full", None), ("energy", 0.5), ("rank_keep", 0.25)]
    for row in rows:
        assert row.bytes == (tmp_path / Path(row.path).name).stat().st_size
        assert set(row.latency) == {1, 32} and row.accuracy is not None
        recorded = json.loads(Path(row.path + ".export.json").read_text())
        assert (recorded["params"], recorded["flops"]) == (row.params, row.flops)
    full, *cut = rows
    assert all(r.params < full.params and r.flops < full.flops for r in cut)
    assert full.layers_factorized == full.layers_plain == 0 and cut[1].layers_factorized > 0


@pytest.mark.parametrize("argv, message", [
    (["--int8", "--qat", "0"], "--qat must be a number of steps >= 1, got 0"),
    (["--int8", "--qat", "-5"], "--qat must be a number of steps >= 1, got -5"),
    (["--qat", "10"], "--qat fine-tunes for the full-integer model: add --int8 (with --format tflite)"),
    (["--int8", "--qat", "10", "--qat-lr", "0"], "--qat-lr must be a positive number, got 0.0"),
    (["--int8", "--qat", "ten"], "argument --qat: invalid int value: 'ten'"),
])
def test_bad_qat_requests_get_one_clear_message_before_any_work(tmp_path, capsys, argv, message):
    """Refused before the run is read (the run directory here does not even exist)."""
    try:
        code = cli.main(["model", "--run", str(tmp_path / "no-run"), "--format", "tflite",
                         "--out", str(tmp_path / "m.tflite"), *argv])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    lines = err.strip().splitlines()  # ours: one line; argparse's own refusal: its usage, then one error line
    assert lines[-1].startswith("python -m export model: error: ") and message in lines[-1]
    assert len(lines) == 1 or message.startswith("argument")


@pytest.mark.slow  # quantization-aware fine-tuning of the tiny run and three conversions: ~1-2 min
def test_qat_export_runs_in_litert_and_tracks_the_float_model(tiny_run, tmp_path, test_images, capsys):
    _, dataset = test_images
    x, y = dataset.x_test.astype(np.float32), dataset.y_test
    out = tmp_path / "q.tflite"
    assert cli.main(["model", "--run", str(tiny_run), "--format", "tflite", "--int8", "--qat", "12",
                     "--representative", "32", "--eval-examples", "-1", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    progress = [line for line in captured.err.splitlines() if line.startswith("quantization-aware fine-tuning")]
    assert progress and progress[-1].startswith("quantization-aware fine-tuning: step 12/12")
    report = json.loads((tmp_path / "q.tflite.export.json").read_text())
    assert report["qat_steps"] == 12 and report["int8"] and report["test_examples"] == len(y)
    assert np.isfinite(report["qat_first_loss"]) and np.isfinite(report["qat_last_loss"])
    # Scored again from the file, in a fresh interpreter: the reported number.
    assert tflite_accuracy(out.read_bytes(), x, y) == pytest.approx(report["exported_accuracy"])
    # The int8 file against the float model: within 3 test images (of the tiny run's 30) of the float TFLite
    # model, and of the fake-quantized Keras model it was converted from.
    tolerance = 3 / len(y) + 1e-9
    assert report["float_tflite_accuracy"] == pytest.approx(report["keras_accuracy"], abs=1 / len(y) + 1e-9)
    assert report["exported_accuracy"] == pytest.approx(report["float_tflite_accuracy"], abs=tolerance)
    assert report["exported_accuracy"] == pytest.approx(report["qat_keras_accuracy"], abs=tolerance)
    assert report["bytes"] < 0.5 * report["float_tflite_bytes"]
