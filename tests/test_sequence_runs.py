"""The zoo's sequence models (and the ViT) through the command line, in real TFF rounds, and the data path under
them: sequence datasets as client data, per-step next-token loss and accuracy, the natural partition, and the one
error a model/dataset mismatch or an image-only option on sequences gets.

Runs call `tff_pipelines.program.cli.main` in this process (the session's TFF worker; `tests/test_cli.py` covers
the subprocess side of the CLI), on tiny data: the offline `python_source` task and `.npz` files written here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import prism_tf
from prism_tf.federated import sequences
from prism_tf.federated.config import TrainConfig, client_budget, round_clients, stored_config
from prism_tf.federated.data import DataError, client_indices
from prism_tf.federated.rundir import RunDir
from tff_pipelines.program import cli
from tff_pipelines.program.client_data import make_client_data

BATCH = 8


def _train(out: Path, **flags) -> list[str]:
    options = dict(width=8, clients=3, clients_per_round=2, rounds=2, batch_size=BATCH, eval_examples=24,
                   examples_per_client=24, calibration_examples=16)
    options.update(flags)
    argv = ["train", "--out", str(out)]
    for name, value in options.items():
        argv += ["--" + name.replace("_", "-"), str(value)]
    return argv


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _check_rows(rows: list[dict], rounds: int, examples: int | None) -> None:
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    for r in rows:
        assert r["clients"] == 2 and r["clients_dropped"] == 0
        assert examples is None or r["num_examples"] == examples
        for key in ("train_loss", "train_accuracy", "eval_loss", "eval_accuracy"):
            assert math.isfinite(r[key]), (key, r)
        assert 0 <= r["train_accuracy"] <= 1 and 0 <= r["eval_accuracy"] <= 1 and r["eval_loss"] > 0


def _npz(path: Path, *, tokens: bool, seed: int = 0) -> Path:
    """A learnable 3-class task: token sequences whose class is their most frequent token (ids 2..4) among noise,
    or [20, 6] feature frames with a class-dependent offset; 4 natural clients (``clients_train``)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", 96), ("test", 24)):
        y = np.arange(n) % 3
        if tokens:
            x = rng.integers(5, 30, (n, 12))
            x[:, ::3] = (y + 2)[:, None]
        else:
            x = rng.normal(size=(n, 20, 6)).astype(np.float32) + y[:, None, None].astype(np.float32)
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x, y
    arrays["clients_train"] = np.arange(96) % 4
    if tokens:
        arrays["vocabulary_size"] = np.int64(30)
    np.savez(path, **arrays)
    return path


def test_charlstm_on_python_source_natural_clients(tmp_path, capsys):
    """Next-character LSTM, 2 rounds on 3 stdlib modules (one client each): loss and accuracy per character."""
    out = tmp_path / "char"
    code, stdout, stderr = _run(_train(out, model="charlstm", dataset="python_source", partition="natural",
                                       sequence_length=16), capsys)
    assert code == 0, stderr
    rows = _rows(out)
    ds = sequences.load_python_source(clients=3, length=16)
    sizes = [min(24, len(c)) for c in ds.natural_clients()]  # a module's windows, at most --examples-per-client
    config = stored_config(RunDir(out))
    for r in rows:  # the round's 2 clients x 2 local epochs, whole batches
        assert r["num_examples"] == sum(sizes[c] * 2 // BATCH * BATCH for c in round_clients(config, r["round"] - 1))
    _check_rows(rows, 2, None)
    for r in rows:
        # Per-character accuracy over 24 windows of 16 characters: a multiple of 1/384.
        assert r["eval_accuracy"] * 384 == pytest.approx(round(r["eval_accuracy"] * 384), abs=1e-3)
        assert r["eval_loss"] < 2 * math.log(200)  # a per-character cross-entropy, not a sum over the window
        # Client training counts characters too: the share of all num_examples x 16 that were right.
        hits = r["train_accuracy"] * r["num_examples"] * 16
        assert hits == pytest.approx(round(hits), abs=0.05)
    spec = json.loads((out / "data_spec.json").read_text())
    assert spec == {"input_shape": [16], "num_classes": ds.num_classes, "vocabulary_size": ds.vocabulary_size}
    assert config.norm is None and config.augment is None  # the model's and the dataset's defaults
    assert not (out / "input_stats.json").exists()  # sequences are not normalized per channel
    assert "Traceback" not in stderr


def test_kws_on_feature_frames_from_npz(tmp_path, capsys):
    data = _npz(tmp_path / "kws.npz", tokens=False)
    out = tmp_path / "kws"
    code, _, stderr = _run(_train(out, model="kws", dataset=data, rounds=1, clients=4), capsys)
    assert code == 0, stderr
    _check_rows(_rows(out), 1, 2 * (24 * 2 // BATCH) * BATCH)
    assert json.loads((out / "data_spec.json").read_text()) == {"input_shape": [20, 6], "num_classes": 3}


def test_lstm_on_token_npz_with_its_natural_partition(tmp_path, capsys):
    data = _npz(tmp_path / "tokens.npz", tokens=True)
    out = tmp_path / "lstm"
    code, _, stderr = _run(_train(out, model="lstm", dataset=data, rounds=1, partition="natural",
                                  method="fedavg"), capsys)
    assert code == 0, stderr
    rows = _rows(out)
    _check_rows(rows, 1, 2 * (24 * 2 // BATCH) * BATCH)
    assert rows[0]["eval_accuracy"] * 24 == pytest.approx(round(rows[0]["eval_accuracy"] * 24), abs=1e-3)


@pytest.mark.slow
def test_vit_on_images(shapes_dataset, tmp_path, capsys):
    """The ViT on the 28x28 test images: --norm unset is LayerNorm (the CLI's CNN default, batch, is not)."""
    out = tmp_path / "vit"
    code, _, stderr = _run(_train(out, model="vit", dataset=shapes_dataset, rounds=1, width=16,
                                  eval_examples=12), capsys)
    assert code == 0, stderr
    _check_rows(_rows(out), 1, 2 * (24 * 2 // BATCH) * BATCH)


@pytest.mark.parametrize("case, flags, words", [
    ("token model on images", dict(model="charlstm", dataset="SHAPES"),
     ("--model charlstm takes token ids", "holds images [28, 28, 1]", "resnet18")),
    ("image model on tokens", dict(model="resnet18", dataset="python_source"),
     ("--model resnet18 takes images", "holds token ids [16]", "a next token per step", "charlstm")),
    ("classifier on next tokens", dict(model="lstm", dataset="python_source"),
     ("--model lstm", "one label per example", "a next token per step")),
    ("image option on sequences", dict(model="charlstm", dataset="python_source", augment="crop_flip"),
     ("--augment crop_flip is for image datasets", "holds sequences")),
    ("natural partition of images", dict(model="small_cnn", dataset="SHAPES", partition="natural"),
     ("--partition natural", "has no natural partition")),
    ("label skew of next tokens", dict(model="charlstm", dataset="python_source", partition="dirichlet:0.5"),
     ("dirichlet:0.5", "a label per step", "iid or natural")),
    ("norm of another model", dict(model="vit", dataset="SHAPES", norm="batch"),
     ("--norm batch does not apply to --model vit", "layer or none")),
])
def test_mismatches_are_one_error(case, flags, words, shapes_dataset, tmp_path, capsys):
    flags = {k: shapes_dataset if v == "SHAPES" else v for k, v in flags.items()}
    out = tmp_path / "run"
    code, stdout, stderr = _run(_train(out, sequence_length=16, **flags), capsys)
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1, stderr
    for word in words:
        assert word in errors[0], (case, errors[0])
    assert not (out / "config.json").exists() and "results:" not in stdout


def test_sequence_client_data_keeps_tokens_int32_and_natural_clients():
    ds = sequences.load_python_source(clients=4, length=10, max_chars=2000)
    data = make_client_data(ds, 3, "natural", seed=1, examples_per_client=5)
    spec = data.element_type_structure
    assert spec["x"] == tf.TensorSpec([10], tf.int32) and spec["y"] == tf.TensorSpec([10], tf.int32)
    natural = ds.natural_clients()
    for client in range(3):
        got = [e["x"].numpy() for e in data.create_tf_dataset_for_client(str(client))]
        want = {tuple(x) for x in ds.x_train[natural[client]]}
        assert len(got) == 5 and {tuple(x) for x in got} <= want  # 5 of the module's own windows
    with pytest.raises(DataError, match="4 natural clients, fewer than --clients 5"):
        client_indices(ds, 5, "natural")
    iid = client_indices(ds, 3, "iid", seed=0)
    assert sorted(np.concatenate(iid).tolist()) == list(range(len(ds.x_train)))


def test_next_token_evaluation_is_per_step():
    """`prism_tf.evaluation.evaluate` on [N, T] labels: the mean cross-entropy and accuracy over all N·T steps."""
    model = prism_tf.models.build_model("charlstm", width=4, num_classes=7, input_shape=(5,), norm=None)
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 7, (11, 5)).astype(np.int32), rng.integers(0, 7, (11, 5)).astype(np.int32)
    logits = model(x).numpy()
    want_loss = float(tf.keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True).numpy().mean())
    want_acc = float(np.mean(logits.argmax(-1) == y))
    for norm in ("moving", "batch"):
        loss, acc = prism_tf.evaluate(model, x, y, batch_size=4, norm=norm, preprocess=np.asarray)
        assert loss == pytest.approx(want_loss, rel=1e-5) and acc == pytest.approx(want_acc)


def test_budget_matching_builds_the_new_models_at_other_widths():
    """`small` and the width methods get PriSM's client flops on the zoo's new models (`client_budget` builds them
    at other widths); a width method on a model with nothing to slice is one error naming both options."""
    _, width, info = client_budget(TrainConfig(model="kws", method="small", width=8), (20, 6), 3)
    assert 1 <= width < 8 and width == info["small_width"]
    assert info["flops_ratio"] == pytest.approx(info["prism_flops_ratio"], rel=0.15)
    _, width, info = client_budget(TrainConfig(model="kws", method="heterofl", width=8), (20, 6), 3)
    assert width == 8 and 0 < info["width_fraction"] < 1
    _, width, _ = client_budget(TrainConfig(model="charlstm", method="small", width=8), (12,), 20, 20)
    assert 1 <= width <= 8
    with pytest.raises(ValueError, match="--method heterofl slices channels, but --model lstm"):
        client_budget(TrainConfig(model="lstm", method="heterofl", width=8), (12,), 2, 30)


def test_load_data_tells_sequences_from_images(tmp_path, shapes_dataset, monkeypatch):
    from tff_pipelines.program import driver, shakespeare

    (tmp_path / "texts").mkdir()
    for name in ("ann", "bob"):
        (tmp_path / "texts" / f"{name}.txt").write_text(f"{name} writes a few words, again and again. " * 5)
    assert sequences.is_sequence_dataset(tmp_path / "texts") and sequences.is_sequence_dataset("x.npz")
    assert not sequences.is_sequence_dataset(shapes_dataset) and not sequences.is_sequence_dataset("cifar10")
    texts = driver.load_data(TrainConfig(dataset=str(tmp_path / "texts"), sequence_length=12))
    assert texts.client_names == ("ann", "bob") and texts.input_shape == (12,)
    assert driver.load_data(TrainConfig(dataset=str(shapes_dataset))).input_shape == (28, 28, 1)
    asked = {}
    monkeypatch.setattr(shakespeare, "load_shakespeare", lambda **kwargs: asked.update(kwargs) or texts)
    assert driver.load_data(TrainConfig(dataset="shakespeare")) is texts and asked == {"length": 80}
    with pytest.raises(DataError, match="dataset path not found: missing.npz"):
        driver.load_data(TrainConfig(dataset="missing.npz"))
    # imdb: Keras's own loader, its download pointed at a file made here; --sequence-length cuts the reviews.
    from keras.src.datasets import imdb as keras_imdb

    reviews = np.empty(2, dtype=object)
    reviews[:] = [[5, 6, 7, 8], [9]]
    np.savez(tmp_path / "imdb.npz", x_train=reviews, y_train=np.array([1, 0]), x_test=reviews, y_test=np.array([0, 1]))
    monkeypatch.setattr(keras_imdb, "get_file", lambda *args, **kwargs: str(tmp_path / "imdb.npz"))
    imdb = driver.load_data(TrainConfig(dataset="imdb", sequence_length=3))
    assert imdb.input_shape == (3,) and imdb.task == "classification" and imdb.vocabulary_size == 10000
