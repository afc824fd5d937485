"""`prism_tf.federated.sequences`: sequence loaders, offline on data the tests make (docs/algorithm.md §1)."""

from __future__ import annotations

import numpy as np
import pytest

from prism_tf.federated import sequences
from prism_tf.federated.data import DataError


def test_imdb_goes_through_keras_own_loader(tmp_path, monkeypatch):
    """Keras's real `imdb.load_data` runs; only its download (`get_file`) is pointed at a file made here."""
    from keras.src.datasets import imdb as keras_imdb

    reviews = np.empty(3, dtype=object)
    reviews[:] = [[5, 6, 7], [8] * 10, [9, 4000]]
    path = tmp_path / "imdb.npz"
    np.savez(path, x_train=reviews, y_train=np.array([1, 0, 1]), x_test=reviews[:2], y_test=np.array([0, 1]))
    monkeypatch.setattr(keras_imdb, "get_file", lambda *args, **kwargs: str(path))
    ds = sequences.load_imdb(num_words=100, maxlen=5, seed=0)
    assert ds.task == "classification" and ds.x_train.shape == (3, 5) and ds.vocabulary_size == 100
    rows = {tuple(r) for r in ds.x_train.tolist()}
    # Keras's conventions: 1 starts a review, words shift by 3, ids >= num_words become 2; front padding/cutting.
    assert rows == {(0, 1, 8, 9, 10), (11, 11, 11, 11, 11), (0, 0, 1, 12, 2)}
    assert sorted(ds.y_train.tolist()) == [0, 1, 1]


def test_text_folder_is_a_natural_partition_of_next_character_windows(tmp_path):
    (tmp_path / "alice.txt").write_text("abcabcabcabcabcabcabca")  # 22 chars: 5 windows of 4
    (tmp_path / "bob.txt").write_text("xyz" * 9)
    (tmp_path / "notes.md").write_text("ignored")
    ds = sequences.load_text_folder(tmp_path, length=4, test_share=0.2)
    assert ds.client_names == ("alice", "bob") and ds.task == "next_token"
    assert ds.vocabulary == ("<pad>", "<oov>", "a", "b", "c", "x", "y", "z")
    a, b, c = 2, 3, 4
    np.testing.assert_array_equal(ds.x_train[0], [a, b, c, a])
    np.testing.assert_array_equal(ds.y_train[0], [b, c, a, b])  # the next characters
    alice, bob = ds.natural_clients()
    assert len(alice) == 4 and len(bob) == 5  # 5 and 6 windows, the last 20% of each held out
    assert len(ds.x_test) == 2
    np.testing.assert_array_equal(sequences.encode("a?", ds.vocabulary), [a, sequences.OOV])


def test_bad_sequence_data_is_one_named_error(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        sequences.load_text_folder(tmp_path / "missing")
    with pytest.raises(DataError, match="no .txt files"):
        sequences.load_text_folder(tmp_path)
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 " * 50)
    with pytest.raises(DataError, match="latin1.txt is not UTF-8"):
        sequences.load_text_folder(tmp_path)
    np.savez(tmp_path / "partial.npz", x_train=np.zeros((2, 3)))
    with pytest.raises(DataError, match="lacks x_test, y_test, y_train"):
        sequences.load_sequence_npz(tmp_path / "partial.npz")
    np.savez(tmp_path / "labels.npz", x_train=np.ones((4, 3), np.int32), y_train=np.array([0, 1, 5, 1]),
             x_test=np.ones((2, 3), np.int32), y_test=np.array([0, 1]), vocabulary_size=2)
    ds = sequences.load_sequence_npz(tmp_path / "labels.npz")
    assert ds.num_classes == 6 and ds.task == "classification"
    np.savez(tmp_path / "tokens.npz", x_train=np.full((4, 3), 7), y_train=np.zeros(4), x_test=np.ones((2, 3)),
             y_test=np.zeros(2), vocabulary_size=5)
    with pytest.raises(DataError, match="token ids outside 0..4"):
        sequences.load_sequence_npz(tmp_path / "tokens.npz")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(DataError, match="junk.npz is not a readable .npz"):
        sequences.load_sequence_npz(tmp_path / "junk.npz")


def test_npz_sequences_keep_features_and_their_partition(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "kws.npz", x_train=rng.normal(size=(6, 49, 10)).astype(np.float32),
             y_train=np.arange(6) % 3, x_test=rng.normal(size=(3, 49, 10)).astype(np.float32),
             y_test=np.arange(3), clients_train=np.array([0, 0, 1, 1, 2, 2]))
    ds = sequences.load_sequence_npz(tmp_path / "kws.npz")
    assert ds.input_shape == (49, 10) and ds.x_train.dtype == np.float32 and ds.num_classes == 3
    assert [c.tolist() for c in ds.natural_clients()] == [[0, 1], [2, 3], [4, 5]]


def test_python_source_is_an_offline_next_character_task():
    ds = sequences.load_python_source(clients=6, length=40, max_chars=4000)
    assert len(ds.client_names) == 6 and ds.task == "next_token" and ds.input_shape == (40,)
    assert all(len(c) > 0 for c in ds.natural_clients())
    text = "".join(ds.vocabulary[i] for i in ds.x_train[0])
    assert len(text) == 40 and ds.vocabulary[ds.y_train[0][-1]] in ds.vocabulary
