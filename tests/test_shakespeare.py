"""TFF's own Shakespeare loader, offline: its cache holds a database in TFF's schema that the test writes."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
import tensorflow as tf

from prism_tf.federated.data import DataError
from tff_pipelines.program.shakespeare import load_shakespeare

ROLES = {"LEAR_KENT": (["Sir, I will serve you.", "Royal Lear, whom I have ever honour'd"], ["Now, banish'd Kent."]),
         "MACBETH_MACBETH": (["So foul and fair a day I have not seen."], ["Is this a dagger which I see"])}


def _database(path) -> None:
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE examples (split_name TEXT NOT NULL, client_id TEXT NOT NULL, "
                       "serialized_example_proto BLOB NOT NULL);")
    connection.execute("CREATE TABLE client_metadata (client_id TEXT NOT NULL, split_name TEXT NOT NULL, "
                       "num_examples INTEGER NOT NULL);")
    for role, splits in ROLES.items():
        for split, snippets in zip(("train", "test"), splits, strict=True):
            for snippet in snippets:
                example = tf.train.Example(features=tf.train.Features(feature={"snippets": tf.train.Feature(
                    bytes_list=tf.train.BytesList(value=[snippet.encode()]))}))
                connection.execute("INSERT INTO examples VALUES (?, ?, ?)",
                                   (split, role, example.SerializeToString()))
            connection.execute("INSERT INTO client_metadata VALUES (?, ?, ?)", (role, split, len(snippets)))
    connection.commit()
    connection.close()


def test_roles_are_clients_of_next_character_windows(tmp_path):
    _database(tmp_path / "shakespeare.sqlite")  # what TFF's download leaves in its cache
    ds = load_shakespeare(cache_dir=tmp_path, length=8)
    assert ds.client_names == tuple(sorted(ROLES)) and ds.task == "next_token"
    lear = "\n".join(ROLES["LEAR_KENT"][0])
    first = "".join(ds.vocabulary[i] for i in ds.x_train[0])
    target = "".join(ds.vocabulary[i] for i in ds.y_train[0])
    assert first == lear[:8] and target == lear[1:9]
    kent = ds.natural_clients()[0]
    assert len(kent) == (len(lear) - 1) // 8
    assert len(ds.x_test) == (len("Now, banish'd Kent.") - 1) // 8 + (len("Is this a dagger which I see") - 1) // 8
    assert np.all(ds.x_test < ds.vocabulary_size)


def test_a_broken_database_is_one_error(tmp_path):
    (tmp_path / "shakespeare.sqlite").write_bytes(b"not a database")
    with pytest.raises(DataError, match="federated Shakespeare could not be loaded"):
        load_shakespeare(cache_dir=tmp_path)
