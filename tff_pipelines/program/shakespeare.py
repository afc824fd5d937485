"""TFF's federated Shakespeare (LEAF: one client per speaking role of a play) as a next-character
`prism_tf.federated.sequences.SequenceDataset`, through TFF's own loader
(`tff.simulation.datasets.shakespeare.load_data`: a download of ``shakespeare.sqlite.lzma`` on first use, cached).

Each role's train and test snippets (TFF splits every role across both) are joined by newlines and cut into
next-character windows; the vocabulary is the training text's characters (docs/algorithm.md §1, layer kinds).
"""

from __future__ import annotations

import os

from prism_tf.federated.data import DataError
from prism_tf.federated.sequences import SequenceDataset, split_texts_to_dataset


def load_shakespeare(cache_dir: str | os.PathLike[str] | None = None, length: int = 80,
                     max_clients: int | None = None) -> SequenceDataset:
    """The roles of federated Shakespeare (all 715, or the first ``max_clients`` by id), windows of ``length``."""
    import tensorflow_federated as tff

    try:
        train, test = tff.simulation.datasets.shakespeare.load_data(
            cache_dir=None if cache_dir is None else str(cache_dir))
        ids = sorted(train.client_ids)[:max_clients]
        texts = {split: {c: "\n".join(s.decode("utf-8") for s in data.create_tf_dataset_for_client(c)
                                      .map(lambda e: e["snippets"]).as_numpy_iterator())
                         for c in ids}
                 for split, data in (("train", train), ("test", test))}
    except DataError:
        raise
    except Exception as e:  # no network, a damaged database: one line naming the cause
        raise DataError(f"federated Shakespeare could not be loaded ({type(e).__name__}: {e})") from None
    return split_texts_to_dataset(texts["train"], texts["test"], length, "tff shakespeare")
