"""Sequence datasets for the recurrent and convolutional sequence models (docs/algorithm.md §1, layer kinds).

Every loader returns a `SequenceDataset`: int32 token ids ``[N, T]`` (or float32 features ``[N, T, F]``) with
either one label per sequence (``task="classification"``: IMDB sentiment) or one target per step
(``task="next_token"``: the next character, Shakespeare-style). Datasets whose examples come from people keep them
apart (``clients_train``: the natural partition, e.g. one client per text file).

- `load_imdb`: Keras's own IMDB loader (`tf.keras.datasets.imdb.load_data`, a download on first use, checked by
  its SHA-256), sequences padded/truncated to ``maxlen`` at the front as `tf.keras.utils.pad_sequences` does.
- `load_text_folder`: a folder of ``*.txt`` files, one client per file, cut into next-character windows.
- `load_sequence_npz`: an ``.npz`` with ``x_train, y_train, x_test, y_test`` (and optionally ``clients_train``).
- `load_python_source`: the offline task of the tests and benches: next-character prediction over the Python
  standard library's own source files (on every machine that runs Python, no download), one client per module.

`load_sequences` picks the loader from a run's ``--dataset`` (`is_sequence_dataset`); federated Shakespeare needs
TFF's loader (`tff_pipelines.program.shakespeare`). Bad data is one `DataError` naming the file and what is wrong.
No TFF here (docs/design.md).
"""

from __future__ import annotations

import dataclasses
import os
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from prism_tf.federated.data import DataError

TASKS = ("classification", "next_token")
PAD, OOV = 0, 1  # character vocabularies: 0 pads, 1 stands for a character the training text never had


@dataclasses.dataclass(frozen=True)
class SequenceDataset:
    """A sequence dataset in memory.

    Attributes:
      x_train, x_test: int32 token ids ``[N, T]`` (or float32 features ``[N, T, F]``).
      y_train, y_test: int32 ``[N]`` labels (``classification``) or ``[N, T]`` next tokens (``next_token``).
      vocabulary_size: token ids are ``0 .. vocabulary_size - 1`` (0 for feature inputs).
      num_classes: labels are ``0 .. num_classes - 1`` (the vocabulary for ``next_token``).
      task: one of `TASKS`.
      clients_train: int32 ``[N]``, the client each training sequence belongs to (a natural partition), or None.
      client_names: the natural clients' names (file names, speaking roles), indexed by ``clients_train``.
      vocabulary: the characters of a character vocabulary (index = id), else ``()``.
      source: where the data came from.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    vocabulary_size: int
    num_classes: int
    task: str
    source: str
    clients_train: np.ndarray | None = None
    client_names: tuple[str, ...] = ()
    vocabulary: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise DataError(f"{self.source}: task must be one of {', '.join(TASKS)}, got {self.task!r}")
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if x.ndim not in (2, 3) or len(x) == 0:
                raise DataError(f"{self.source}: x_{split} must be a non-empty [N, T] or [N, T, F] array, got "
                                f"shape {x.shape}")
            expected = (len(x),) if self.task == "classification" else x.shape[:2]
            if y.shape != expected:
                raise DataError(f"{self.source}: y_{split} must have shape {expected} for {self.task}, got {y.shape}")
            if y.min() < 0 or y.max() >= self.num_classes:
                raise DataError(f"{self.source}: y_{split} has labels outside 0..{self.num_classes - 1}")
            if x.ndim == 2 and (x.min() < 0 or x.max() >= self.vocabulary_size):
                raise DataError(f"{self.source}: x_{split} has token ids outside 0..{self.vocabulary_size - 1}")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DataError(f"{self.source}: train and test sequences differ in shape: {self.x_train.shape[1:]} vs "
                            f"{self.x_test.shape[1:]}")
        if self.clients_train is not None and self.clients_train.shape != (len(self.x_train),):
            raise DataError(f"{self.source}: clients_train must have one entry per training sequence")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One example's shape: ``(T,)`` token ids or ``(T, F)`` features."""
        return tuple(int(d) for d in self.x_train.shape[1:])

    def natural_clients(self) -> list[np.ndarray]:
        """The training indices of each natural client (`clients_train`), in client order."""
        if self.clients_train is None:
            raise DataError(f"{self.source} has no natural partition; partition it like any dataset instead")
        return [np.flatnonzero(self.clients_train == c) for c in range(len(self.client_names))]


def pad_front(sequences: Sequence[Sequence[int]], length: int) -> np.ndarray:
    """``[N, length]`` int32: each sequence's last ``length`` tokens, zero-padded at the front (Keras's
    ``pad_sequences`` defaults, ``padding="pre"``, ``truncating="pre"``)."""
    out = np.zeros((len(sequences), length), np.int32)
    for i, seq in enumerate(sequences):
        tail = list(seq)[-length:]
        if tail:
            out[i, length - len(tail):] = tail
    return out


def load_imdb(num_words: int = 10000, maxlen: int = 200, *, seed: int = 113) -> SequenceDataset:
    """IMDB movie-review sentiment (25,000 train / 25,000 test reviews) through Keras's own loader.

    Word ids are Keras's (1 starts a review, 2 is a word outside the ``num_words`` most frequent, 3.. words);
    every review is cut or padded to its last ``maxlen`` words.
    """
    import tensorflow as tf

    try:
        (x_train, y_train), (x_test, y_test) = tf.keras.datasets.imdb.load_data(num_words=num_words, seed=seed)
    except Exception as e:  # network, a damaged cache file: one line naming the cause
        raise DataError(f"IMDB could not be loaded ({type(e).__name__}: {e})") from None
    return SequenceDataset(pad_front(x_train, maxlen), np.asarray(y_train, np.int32), pad_front(x_test, maxlen),
                           np.asarray(y_test, np.int32), vocabulary_size=int(num_words), num_classes=2,
                           task="classification", source="keras imdb")


def char_vocabulary(texts: Sequence[str]) -> tuple[str, ...]:
    """The characters of ``texts``, sorted, after the pad and out-of-vocabulary slots (ids 0 and 1)."""
    return ("<pad>", "<oov>", *sorted(set("".join(texts))))


def encode(text: str, vocabulary: Sequence[str]) -> np.ndarray:
    """Character ids of ``text`` (`OOV` for characters not in ``vocabulary``)."""
    index = {c: i for i, c in enumerate(vocabulary)}
    return np.fromiter((index.get(c, OOV) for c in text), np.int32, len(text))


def next_token_windows(ids: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping windows of ``length`` inputs and their next tokens: ``x = ids[s:s+length]``,
    ``y = ids[s+1:s+length+1]``."""
    count = (len(ids) - 1) // length
    x = np.stack([ids[i * length:(i + 1) * length] for i in range(count)]) if count else np.zeros((0, length))
    y = np.stack([ids[i * length + 1:(i + 1) * length + 1] for i in range(count)]) if count else np.zeros((0, length))
    return x.astype(np.int32), y.astype(np.int32)


def texts_to_dataset(texts: dict[str, str], length: int, test_share: float, source: str) -> SequenceDataset:
    """Next-character windows of each named text (a client each); the last ``test_share`` of every client's
    windows is held out for the test set (every client trains and is tested, as TFF's Shakespeare is split)."""
    if not 0 < test_share < 1:
        raise DataError(f"{source}: test share must be in (0, 1), got {test_share}")
    vocabulary = char_vocabulary(list(texts.values()))
    parts = {"x_train": [], "y_train": [], "x_test": [], "y_test": [], "clients": []}
    names = []
    for name, text in texts.items():
        x, y = next_token_windows(encode(text, vocabulary), length)
        if len(x) < 2:
            continue  # too short to give both a training and a test window
        cut = max(1, int(round(len(x) * (1 - test_share))))
        cut = min(cut, len(x) - 1)
        parts["x_train"].append(x[:cut])
        parts["y_train"].append(y[:cut])
        parts["x_test"].append(x[cut:])
        parts["y_test"].append(y[cut:])
        parts["clients"].append(np.full(cut, len(names), np.int32))
        names.append(name)
    if not names:
        raise DataError(f"{source}: no text is long enough for two windows of {length} characters")
    x_train, y_train, x_test, y_test, clients = (np.concatenate(parts[k]) for k in
                                                 ("x_train", "y_train", "x_test", "y_test", "clients"))
    return SequenceDataset(x_train, y_train, x_test, y_test, vocabulary_size=len(vocabulary),
                           num_classes=len(vocabulary), task="next_token", source=source, clients_train=clients,
                           client_names=tuple(names), vocabulary=vocabulary)


def split_texts_to_dataset(train: dict[str, str], test: dict[str, str], length: int,
                           source: str) -> SequenceDataset:
    """Next-character windows of texts already split per client (``train[name]``, ``test[name]``): one client per
    name, the vocabulary from the training texts (`OOV` for characters only the test texts have)."""
    vocabulary = char_vocabulary(list(train.values()))
    xs, ys, tx, ty, clients, names = [], [], [], [], [], []
    for name, text in train.items():
        x, y = next_token_windows(encode(text, vocabulary), length)
        if not len(x):
            continue
        xs.append(x)
        ys.append(y)
        clients.append(np.full(len(x), len(names), np.int32))
        names.append(name)
        x, y = next_token_windows(encode(test.get(name, ""), vocabulary), length)
        tx.append(x)
        ty.append(y)
    if not names or not sum(len(x) for x in tx):
        raise DataError(f"{source}: no client has {length + 1} characters of text in both splits")
    return SequenceDataset(np.concatenate(xs), np.concatenate(ys), np.concatenate(tx), np.concatenate(ty),
                           vocabulary_size=len(vocabulary), num_classes=len(vocabulary), task="next_token",
                           source=source, clients_train=np.concatenate(clients), client_names=tuple(names),
                           vocabulary=vocabulary)


def load_text_folder(path: str | os.PathLike[str], length: int = 80, test_share: float = 0.1) -> SequenceDataset:
    """Every ``*.txt`` file of the folder ``path`` (UTF-8) is one client's text, cut into next-character windows
    of ``length``."""
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a directory of .txt files")
    texts = {}
    for file in sorted(folder.glob("*.txt")):
        try:
            texts[file.stem] = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{file} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not texts:
        raise DataError(f"{folder} holds no .txt files")
    return texts_to_dataset(texts, length, test_share, str(folder))


def load_python_source(clients: int = 50, length: int = 80, test_share: float = 0.1,
                       max_chars: int = 20000) -> SequenceDataset:
    """The offline next-character task: the first ``clients`` modules (by name) of this Python's standard library,
    at most ``max_chars`` characters each, one client per module. Real text with a real natural partition (each
    module has its author's style and vocabulary), on every machine, with no download: what the tests and the
    sequence benches train on here."""
    folder = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in folder.glob("*.py") if p.stat().st_size > 4 * length)[:clients]
    texts = {p.stem: p.read_text(encoding="utf-8", errors="replace")[:max_chars] for p in files}
    return texts_to_dataset(texts, length, test_share, f"python stdlib ({folder})")


def load_sequence_npz(path: str | os.PathLike[str], task: str | None = None) -> SequenceDataset:
    """An ``.npz`` with integer ``x_train, x_test`` ``[N, T]`` (or float ``[N, T, F]`` features) and labels
    ``y_train, y_test``; optional ``clients_train`` ``[N]`` (a natural partition) and ``vocabulary_size``. The task
    is ``next_token`` when the labels are per step, else ``classification``."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is not a readable .npz file ({e})") from None
    missing = {"x_train", "y_train", "x_test", "y_test"} - set(arrays)
    if missing:
        raise DataError(f"{path} lacks {', '.join(sorted(missing))}")
    x_train, x_test = arrays["x_train"], arrays["x_test"]
    features = np.issubdtype(x_train.dtype, np.floating)
    cast = np.float32 if features else np.int32
    y_train, y_test = arrays["y_train"].astype(np.int32), arrays["y_test"].astype(np.int32)
    task = task or ("next_token" if y_train.ndim == 2 else "classification")
    if features:
        vocabulary = 0
    else:
        vocabulary = int(arrays.get("vocabulary_size", max(int(x_train.max()), int(x_test.max())) + 1))
    classes = vocabulary if task == "next_token" else int(max(y_train.max(), y_test.max())) + 1
    clients = arrays.get("clients_train")
    names = tuple(str(c) for c in range(int(clients.max()) + 1)) if clients is not None else ()
    return SequenceDataset(x_train.astype(cast), y_train, x_test.astype(cast), y_test, vocabulary_size=vocabulary,
                           num_classes=max(classes, 2), task=task, source=str(path),
                           clients_train=None if clients is None else clients.astype(np.int32), client_names=names)


NAMED = ("imdb", "python_source", "shakespeare")
"""The sequence datasets a run names (others are given by path: a folder of ``.txt`` files, a ``.npz``)."""
DEFAULT_LENGTH = {"imdb": 200, "text": 80}  # IMDB reviews cut to 200 words; next-character windows of 80


def is_sequence_dataset(name: str | os.PathLike[str]) -> bool:
    """Whether a run's ``--dataset`` names a sequence dataset: one of `NAMED`, a ``.npz`` file, or a folder of
    ``.txt`` files (a folder with ``train/`` and ``test/`` class folders is an image dataset)."""
    text = os.fspath(name)
    if text in NAMED or text.lower().endswith(".npz"):
        return True
    folder = Path(os.path.expanduser(text))
    return folder.is_dir() and not (folder / "train").is_dir() and any(folder.glob("*.txt"))


def load_sequences(name: str | os.PathLike[str], *, length: int | None = None,
                   clients: int = 50) -> SequenceDataset:
    """The sequence dataset a run names (`is_sequence_dataset`; ``shakespeare`` excepted: it needs TFF).

    ``length``: IMDB's review length (default 200) or the next-character window (default 80); a ``.npz`` keeps its
    stored length. ``clients``: how many standard-library modules ``python_source`` reads (one client each).
    """
    text = os.fspath(name)
    if text == "imdb":
        return load_imdb(maxlen=length or DEFAULT_LENGTH["imdb"])
    if text == "python_source":
        return load_python_source(clients=clients, length=length or DEFAULT_LENGTH["text"])
    if text == "shakespeare":
        raise DataError("federated Shakespeare loads through TFF (tff_pipelines.program.shakespeare)")
    path = Path(os.path.expanduser(text))
    if text.lower().endswith(".npz"):
        if not path.is_file():
            raise DataError(f"dataset path not found: {text}")
        return load_sequence_npz(path)
    return load_text_folder(path, length=length or DEFAULT_LENGTH["text"])


__all__ = ["DEFAULT_LENGTH", "NAMED", "SequenceDataset", "TASKS", "char_vocabulary", "encode", "is_sequence_dataset",
           "load_imdb", "load_python_source", "load_sequence_npz", "load_sequences", "load_text_folder",
           "next_token_windows", "pad_front", "split_texts_to_dataset", "texts_to_dataset"]
