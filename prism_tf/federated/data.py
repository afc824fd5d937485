"""Image datasets for the federated pipelines: loading, caching, partitioning into clients.

Expected layout of a dataset given by path (a directory, or a ``.tar.gz`` / ``.tgz`` / ``.tar`` archive)::

    [<one top-level folder>/]
        train/<class name>/*.png|*.jpg|*.jpeg
        test/<class name>/*.png|*.jpg|*.jpeg

Class names are the folder names, sorted; ``train/`` and ``test/`` must hold the same classes, every class
folder must hold at least one image, and all images must share one size and one mode (grayscale gives
``C=1``, RGB ``C=3``). Hidden files and files with other extensions are ignored. The shared CIFAR-10 archive
has this layout (``cifar10/{train,test}/<class>/*.jpg``). ``load_dataset("cifar10")`` uses a local copy when
one is found (see :func:`find_cifar10`) and otherwise falls back to ``tf.keras.datasets.cifar10.load_data()``
(a download).

Decoded arrays are cached as uncompressed ``.npz`` files under ``$PRISM_CACHE`` (default
``~/.cache/prism-tf``), keyed by the source's absolute path, size and modification time, so a second load is a
plain ``np.load``.

:func:`partition` splits the training set over clients (``iid``, ``dirichlet:<alpha>`` label skew,
``shards:<k>``); `tff_pipelines.program.client_data.make_client_data` wraps the result as a TFF ``ClientData``
(this module imports no TFF: docs/design.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path, PurePosixPath

import numpy as np

__all__ = [
    "CIFAR10_CLASSES",
    "DataError",
    "PIXEL_MAX",
    "ImageDataset",
    "client_indices",
    "find_cifar10",
    "load_dataset",
    "partition",
    "to_float",
]

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
SHARED_CIFAR10 = PurePosixPath("shared/data/cifar10-jpg.tar.gz")
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg"})
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
SPLITS = ("train", "test")
_CACHE_VERSION = 1
PIXEL_MAX = 255.0
"""The largest pixel value: `to_float` maps ``0..PIXEL_MAX`` to ``[0, 1]``."""


class DataError(ValueError):
    """A user-facing data problem; the message names the file or folder concerned."""


@dataclasses.dataclass(frozen=True)
class ImageDataset:
    """A decoded image classification dataset held in memory as uint8 arrays."""

    x_train: np.ndarray  # uint8 [N, H, W, C]
    y_train: np.ndarray  # int32 [N]
    x_test: np.ndarray  # uint8 [M, H, W, C]
    y_test: np.ndarray  # int32 [M]
    class_names: tuple[str, ...]
    source: str  # path of the directory/archive, or "keras download"

    def __post_init__(self) -> None:
        for name in ("x_train", "x_test"):
            x = getattr(self, name)
            if x.dtype != np.uint8 or x.ndim != 4:
                raise ValueError(f"{name} must be uint8 [N, H, W, C], got {x.dtype} {x.shape}")
        for x, y, split in ((self.x_train, self.y_train, "train"), (self.x_test, self.y_test, "test")):
            if y.dtype != np.int32 or y.shape != (len(x),):
                raise ValueError(f"y_{split} must be int32 [{len(x)}], got {y.dtype} {y.shape}")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            shapes = f"{self.x_train.shape[1:]} vs {self.x_test.shape[1:]}"
            raise ValueError(f"train/test image shapes differ: {shapes}")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one image, ``(H, W, C)``."""
        h, w, c = self.x_train.shape[1:]
        return int(h), int(w), int(c)

    @property
    def num_classes(self) -> int:
        """Number of classes (labels are ``0 .. num_classes - 1``)."""
        return len(self.class_names)


def to_float(x: np.ndarray) -> np.ndarray:
    """Scale uint8 pixels to float32 in ``[0, 1]`` (the one place that defines the input scaling)."""
    return np.asarray(x).astype(np.float32) / np.float32(PIXEL_MAX)


# --------------------------------------------------------------------------------------------- locating data


def find_cifar10(data: str | os.PathLike[str] | None = None) -> str | None:
    """Return the path of a local CIFAR-10 copy, or ``None`` if there is none.

    Order: the explicit ``data`` path; the environment variable ``PRISM_DATA``; a
    ``shared/data/cifar10-jpg.tar.gz`` in the current working directory, the package directory or any of their
    parents (e.g. ``shared/data/...`` beside the checkout). An explicit path (argument or
    ``PRISM_DATA``) is returned even if it does not exist, so that loading it fails loudly instead of silently
    downloading something else.
    """
    if data is not None and str(data) != "":
        return os.path.expanduser(os.fspath(data))
    env = os.environ.get("PRISM_DATA")
    if env:
        return os.path.expanduser(env)
    seen: set[Path] = set()
    for base in (Path.cwd(), Path(__file__).resolve().parent):
        for folder in (base, *base.parents):
            if folder in seen:
                continue
            seen.add(folder)
            candidate = folder / SHARED_CIFAR10
            if candidate.is_file():
                return str(candidate)
    return None


# --------------------------------------------------------------------------------------------- loading


def load_dataset(
    dataset: str = "cifar10",
    *,
    data: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> ImageDataset:
    """Load an image dataset as uint8 arrays.

    Args:
      dataset: ``"cifar10"`` (a local copy found by :func:`find_cifar10`, else the Keras download), or the
        path of a directory / ``.tar.gz`` / ``.tgz`` / ``.tar`` archive in the class-folder layout (see the
        module docstring).
      data: where to find CIFAR-10 (only used when ``dataset == "cifar10"``).
      cache_dir: where decoded arrays are cached (default ``$PRISM_CACHE`` or ``~/.cache/prism-tf``).
      progress: show a progress bar while reading/decoding.

    Raises:
      DataError: missing path, unsupported file, wrong layout, empty class folder, unreadable or mismatched
        image.
    """
    if dataset == "cifar10":
        local = find_cifar10(data)
        if local is None:
            return _load_keras_cifar10(progress)
        path = local
    else:
        path = os.path.expanduser(os.fspath(dataset))
    return _load_path(path, cache_dir=cache_dir, progress=progress)


def _load_keras_cifar10(progress: bool) -> ImageDataset:
    if progress:
        msg = "prism-tf: no local CIFAR-10 found; using tf.keras.datasets.cifar10 (downloads once)"
        print(msg, file=sys.stderr)
    import tensorflow as tf

    (x_train, y_train), (x_test, y_test) = tf.keras.datasets.cifar10.load_data()
    return ImageDataset(
        x_train=np.asarray(x_train, dtype=np.uint8),
        y_train=np.asarray(y_train).reshape(-1).astype(np.int32),
        x_test=np.asarray(x_test, dtype=np.uint8),
        y_test=np.asarray(y_test).reshape(-1).astype(np.int32),
        class_names=CIFAR10_CLASSES,
        source="keras download",
    )


def _load_path(path: str, *, cache_dir: str | os.PathLike[str] | None, progress: bool) -> ImageDataset:
    abspath = os.path.realpath(path)
    if not os.path.exists(abspath):
        raise DataError(f"dataset path not found: {path}")
    if os.path.isfile(abspath) and not abspath.lower().endswith(ARCHIVE_SUFFIXES):
        expected = "/".join(ARCHIVE_SUFFIXES[:3])
        raise DataError(f"unsupported dataset file: {path} (expected a directory or a {expected} archive)")
    cache_file = _cache_path(abspath, cache_dir)
    cached = _read_cache(cache_file, abspath)
    if cached is not None:
        return cached
    if os.path.isdir(abspath):
        files = _scan_directory(abspath)
    else:
        files = _scan_archive(abspath, progress)
    ds = _decode_all(files, abspath, progress)
    _write_cache(cache_file, ds)
    return ds


# A scanned dataset: split -> class -> list of (display name, payload); payload is a file path or the bytes.
_Files = dict[str, dict[str, list[tuple[str, str | bytes]]]]


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _scan_directory(root: str) -> _Files:
    def has_split(folder: str) -> bool:
        return any(os.path.isdir(os.path.join(folder, s)) for s in SPLITS)

    base = root
    if not has_split(root):
        subdirs = [e.path for e in os.scandir(root) if e.is_dir() and not _is_hidden(e.name)]
        if len(subdirs) == 1 and has_split(subdirs[0]):
            base = subdirs[0]
        else:
            raise DataError(f"no train/ or test/ folder in {root} (expected train/<class>/*.png|jpg)")
    files: _Files = {}
    for split in SPLITS:
        split_dir = os.path.join(base, split)
        if not os.path.isdir(split_dir):
            raise DataError(f"no {split}/ folder in {base}")
        classes: dict[str, list[tuple[str, str | bytes]]] = {}
        for entry in os.scandir(split_dir):
            if not entry.is_dir() or _is_hidden(entry.name):
                continue
            images = [
                (f.path, f.path)
                for f in os.scandir(entry.path)
                if f.is_file() and not _is_hidden(f.name) and _is_image(f.name)
            ]
            classes[entry.name] = images
        files[split] = classes
    _check_layout(files, base)
    return files


def _scan_archive(path: str, progress: bool) -> _Files:
    from tqdm import tqdm

    entries: list[tuple[tuple[str, ...], bytes | None, str]] = []  # (parts, bytes or None for a dir, name)
    try:
        with tarfile.open(path, "r|*") as tar, tqdm(
            desc=f"reading {os.path.basename(path)}", unit=" files", disable=not progress, leave=False
        ) as bar:
            for member in tar:
                parts = tuple(p for p in PurePosixPath(member.name).parts if p not in ("", ".", "/"))
                if not parts or any(_is_hidden(p) for p in parts):
                    continue
                if member.isdir():
                    entries.append((parts, None, member.name))
                elif member.isfile() and _is_image(parts[-1]):
                    handle = tar.extractfile(member)
                    assert handle is not None
                    entries.append((parts, handle.read(), member.name))
                    bar.update(1)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"cannot read archive {path}: {e}") from e

    # Where are train/ and test/: at the top, or under exactly one top-level folder?
    if any(parts[0] in SPLITS for parts, _, _ in entries):
        prefix: tuple[str, ...] = ()
    else:
        tops = sorted({parts[0] for parts, _, _ in entries if len(parts) > 1 and parts[1] in SPLITS})
        if len(tops) != 1:
            found = f" (found several top-level folders: {', '.join(tops)})" if tops else ""
            raise DataError(f"no train/ or test/ folder in archive {path}{found}")
        prefix = (tops[0],)
    files: _Files = {split: {} for split in SPLITS}
    seen_splits: set[str] = set()
    for parts, payload, name in entries:
        if parts[: len(prefix)] != prefix:
            continue
        rel = parts[len(prefix):]
        if not rel or rel[0] not in SPLITS:
            continue
        seen_splits.add(rel[0])
        classes = files[rel[0]]
        if payload is None:
            if len(rel) == 2:
                classes.setdefault(rel[1], [])
        elif len(rel) == 3:
            classes.setdefault(rel[1], []).append((f"{path}:{name}", payload))
    base = f"archive {path}" + (f" (under {prefix[0]}/)" if prefix else "")
    for split in SPLITS:
        if split not in seen_splits:
            raise DataError(f"no {split}/ folder in {base}")
    _check_layout(files, base)
    return files


def _check_layout(files: _Files, where: str) -> None:
    for split in SPLITS:
        classes = files[split]
        if not classes:
            raise DataError(f"{split}/ in {where} has no class folders (expected {split}/<class>/*.png|jpg)")
        for cls in sorted(classes):
            if not classes[cls]:
                raise DataError(f"empty class folder {split}/{cls} in {where} (no .png/.jpg/.jpeg images)")
    train, test = set(files["train"]), set(files["test"])
    if train != test:
        parts = []
        if train - test:
            parts.append(f"only in train/: {', '.join(sorted(train - test))}")
        if test - train:
            parts.append(f"only in test/: {', '.join(sorted(test - train))}")
        raise DataError(f"train/ and test/ class folders differ in {where}: {'; '.join(parts)}")
    if len(train) < 2:
        raise DataError(f"only one class folder ({', '.join(train)}) in {where}: a classifier needs at least 2")


def _decode_one(name: str, payload: str | bytes) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(payload) if isinstance(payload, bytes) else payload) as im:
            if im.mode in ("1", "LA"):
                im = im.convert("L")
            elif im.mode in ("RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
                im = im.convert("RGB")
            elif im.mode not in ("L", "RGB"):
                raise DataError(f"unsupported image mode {im.mode} in {name} (expected grayscale or RGB)")
            arr = np.asarray(im, dtype=np.uint8)
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot decode image {name}: {e}") from e
    return arr[:, :, None] if arr.ndim == 2 else arr


def _describe(shape: tuple[int, ...]) -> str:
    h, w, c = shape
    return f"{w}x{h} {'grayscale' if c == 1 else 'RGB'}"


def _decode_all(files: _Files, source: str, progress: bool) -> ImageDataset:
    from tqdm import tqdm

    class_names = tuple(sorted(files["train"]))
    total = sum(len(v) for classes in files.values() for v in classes.values())
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    shape: tuple[int, ...] | None = None
    first = ""
    desc = f"decoding {os.path.basename(source)}"
    with tqdm(total=total, desc=desc, unit=" img", disable=not progress) as bar:
        for split in SPLITS:
            items = [
                (label, name, payload)
                for label, cls in enumerate(class_names)
                for name, payload in sorted(files[split][cls], key=lambda t: t[0])
            ]
            x: np.ndarray | None = None
            y = np.empty(len(items), dtype=np.int32)
            for i, (label, name, payload) in enumerate(items):
                img = _decode_one(name, payload)
                if shape is None:
                    shape, first = img.shape, name
                elif img.shape != shape:
                    raise DataError(
                        f"image {name} is {_describe(img.shape)} but {first} is {_describe(shape)}: "
                        "all images of a dataset must share one size and mode"
                    )
                if x is None:
                    x = np.empty((len(items), *shape), dtype=np.uint8)
                x[i] = img
                y[i] = label
                bar.update(1)
            assert x is not None
            arrays[split] = (x, y)
    return ImageDataset(
        x_train=arrays["train"][0],
        y_train=arrays["train"][1],
        x_test=arrays["test"][0],
        y_test=arrays["test"][1],
        class_names=class_names,
        source=source,
    )


# --------------------------------------------------------------------------------------------- cache


def default_cache_dir() -> str:
    """The cache directory used when none is given: ``$PRISM_CACHE`` or ``~/.cache/prism-tf``."""
    return os.environ.get("PRISM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "prism-tf")


def _fingerprint(abspath: str) -> list[object]:
    """Size + mtime of an archive; for a directory, of every file below it (its own mtime misses edits)."""
    if os.path.isfile(abspath):
        st = os.stat(abspath)
        return [st.st_size, st.st_mtime_ns]
    digest = hashlib.sha256()
    count = 0
    stack = [abspath]
    while stack:
        folder = stack.pop()
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.is_dir():
                stack.append(entry.path)
            elif entry.is_file():
                st = entry.stat()
                digest.update(f"{entry.path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
                count += 1
    return [count, digest.hexdigest()]


def _cache_path(abspath: str, cache_dir: str | os.PathLike[str] | None) -> str:
    folder = os.path.expanduser(os.fspath(cache_dir)) if cache_dir is not None else default_cache_dir()
    key = json.dumps([_CACHE_VERSION, abspath, _fingerprint(abspath)])
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in os.path.basename(abspath))[:60]
    return os.path.join(folder, f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz")


def _read_cache(cache_file: str, source: str) -> ImageDataset | None:
    if not os.path.isfile(cache_file):
        return None
    try:
        with np.load(cache_file, allow_pickle=False) as z:
            return ImageDataset(
                x_train=z["x_train"],
                y_train=z["y_train"],
                x_test=z["x_test"],
                y_test=z["y_test"],
                class_names=tuple(str(c) for c in z["class_names"]),
                source=source,
            )
    except Exception as e:  # a damaged cache is never fatal: decode again and overwrite it
        warnings.warn(f"ignoring unreadable cache file {cache_file}: {e}", stacklevel=3)
        return None


def _write_cache(cache_file: str, ds: ImageDataset) -> None:
    folder = os.path.dirname(cache_file)
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".npz")
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache holds public data
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                x_train=ds.x_train,
                y_train=ds.y_train,
                x_test=ds.x_test,
                y_test=ds.y_test,
                class_names=np.array(ds.class_names, dtype=str),
            )
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, cache_file)
        tmp = None
    except OSError as e:  # caching is an optimisation: an unwritable cache only costs time
        warnings.warn(f"could not write cache file {cache_file}: {e}", stacklevel=3)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


# --------------------------------------------------------------------------------------------- partitioning


def _parse_scheme(scheme: str) -> tuple[str, float]:
    text = str(scheme).strip().lower()
    kind, _, arg = text.partition(":")
    usage = ("expected 'iid', 'dirichlet:<alpha>' (alpha > 0), 'shards:<k>' (k >= 1) or, for datasets with a natural "
             "partition, 'natural'")
    if kind == "iid" and not arg:
        return "iid", 0.0
    if kind == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            raise DataError(f"bad partition scheme {scheme!r}: {arg!r} is not a number; {usage}") from None
        if not math.isfinite(alpha) or alpha <= 0:
            raise DataError(f"bad partition scheme {scheme!r}: alpha must be a positive number; {usage}")
        return "dirichlet", alpha
    if kind == "shards":
        try:
            k = int(arg)
        except ValueError:
            raise DataError(f"bad partition scheme {scheme!r}: {arg!r} is not an integer; {usage}") from None
        if k < 1:
            raise DataError(f"bad partition scheme {scheme!r}: k must be >= 1; {usage}")
        return "shards", float(k)
    raise DataError(f"unknown partition scheme {scheme!r}; {usage}")


def partition(
    labels: np.ndarray,
    num_clients: int,
    scheme: str = "iid",
    *,
    seed: int = 0,
    examples_per_client: int | None = None,
) -> list[np.ndarray]:
    """Split a training set over clients; returns one int64 index array (into ``labels``) per client.

    Clients are disjoint, every client gets at least one example, and each client's indices come in a random
    order (the loaded arrays are sorted by class). The result depends only on the arguments (``seed``
    included).

    Schemes:
      ``"iid"``: a random permutation cut into ``num_clients`` parts whose sizes differ by at most one.
      ``"dirichlet:<alpha>"``: label skew; for every class, the proportions of its examples over the clients
        are drawn from ``Dir(alpha)`` (small alpha: few classes per client; large alpha: close to iid). A
        client left empty takes one example from the largest client.
      ``"shards:<k>"``: examples sorted by label are cut into ``num_clients * k`` shards of (nearly) equal
        size and every client gets ``k`` random shards (so at most about ``k`` classes).

    Args:
      labels: int labels ``[N]`` of the training set.
      num_clients: number of clients (``1 <= num_clients <= N``, and ``num_clients * k <= N`` for shards).
      scheme: see above.
      seed: random seed.
      examples_per_client: if given, each client keeps a random subset of at most this many of its examples.

    Raises:
      DataError: bad scheme string, alpha <= 0, too many clients for the data, bad ``examples_per_client``.
    """
    kind, param = _parse_scheme(scheme)
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels must be a 1-D integer array, got {labels.dtype} with shape {labels.shape}")
    n = len(labels)
    if isinstance(num_clients, bool) or not isinstance(num_clients, int | np.integer) or num_clients < 1:
        raise DataError(f"num_clients must be a positive integer, got {num_clients!r}")
    if num_clients > n:
        raise DataError(f"too many clients for the data: {num_clients} clients but {n} training examples")
    if examples_per_client is not None and (
        isinstance(examples_per_client, bool)
        or not isinstance(examples_per_client, int | np.integer)
        or examples_per_client < 1
    ):
        got = repr(examples_per_client)
        raise DataError(f"examples_per_client must be a positive integer or None, got {got}")
    rng = np.random.default_rng(seed)

    if kind == "iid":
        parts = list(np.array_split(rng.permutation(n), num_clients))
    elif kind == "dirichlet":
        parts = _dirichlet_split(labels, num_clients, param, rng)
    else:
        k = int(param)
        if num_clients * k > n:
            raise DataError(
                f"too many clients for the data: {num_clients} clients x {k} shards = {num_clients * k} "
                f"shards but {n} training examples"
            )
        order = rng.permutation(n)
        order = order[np.argsort(labels[order], kind="stable")]  # sorted by label, random within a class
        shards = np.array_split(order, num_clients * k)
        shard_ids = rng.permutation(num_clients * k)
        parts = [
            np.concatenate([shards[j] for j in shard_ids[i * k:(i + 1) * k]]) for i in range(num_clients)
        ]

    result = []
    for part in parts:
        part = rng.permutation(part).astype(np.int64)
        if examples_per_client is not None:
            part = part[:examples_per_client]
        result.append(part)
    return result


def client_indices(
    ds,
    num_clients: int,
    scheme: str = "iid",
    *,
    seed: int = 0,
    examples_per_client: int | None = None,
) -> list[np.ndarray]:
    """The training indices of each of ``num_clients`` clients of an image or sequence dataset.

    ``scheme`` is a `partition` scheme, or ``"natural"``: the first ``num_clients`` clients of the dataset's own
    partition (`prism_tf.federated.sequences.SequenceDataset.natural_clients`: one per text file, speaking role,
    ...; each client's examples in a seeded random order, at most ``examples_per_client`` of them). Label-skew
    schemes need one label per example: a next-token dataset is partitioned ``iid`` or ``natural``.

    Raises:
      DataError: as `partition`; a dataset without a natural partition, or with fewer natural clients than asked.
    """
    labels = np.asarray(ds.y_train)
    if str(scheme).strip().lower() == "natural":
        if not hasattr(ds, "natural_clients") or getattr(ds, "clients_train", None) is None:
            raise DataError(f"--partition natural: {ds.source} has no natural partition (only sequence datasets "
                            "whose examples come from people or files do: shakespeare, python_source, a .txt "
                            "folder, a .npz with clients_train); use iid, dirichlet:ALPHA or shards:K")
        natural = ds.natural_clients()
        if len(natural) < num_clients:
            raise DataError(f"--partition natural: {ds.source} has {len(natural)} natural clients, fewer than "
                            f"--clients {num_clients}")
        rng = np.random.default_rng(seed)
        return [rng.permutation(part).astype(np.int64)[:examples_per_client] for part in natural[:num_clients]]
    if labels.ndim != 1:
        if _parse_scheme(scheme)[0] != "iid":
            raise DataError(f"partition {scheme!r} skews labels, but {ds.source} has a label per step "
                            f"({labels.shape[1:]} per example); use iid or natural")
        labels = np.zeros(len(labels), np.int32)
    return partition(labels, num_clients, scheme, seed=seed, examples_per_client=examples_per_client)


def _dirichlet_split(labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator) -> list:
    buckets: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        p = rng.dirichlet(np.full(num_clients, alpha))
        if not np.all(np.isfinite(p)) or p.sum() <= 0:  # underflow for tiny alpha: all mass on one client
            p = np.zeros(num_clients)
            p[rng.integers(num_clients)] = 1.0
        cuts = np.minimum((np.cumsum(p)[:-1] * len(idx)).round().astype(np.int64), len(idx))
        for client, piece in enumerate(np.split(idx, cuts)):
            buckets[client].append(piece)
    parts = [np.concatenate(b) if b else np.empty(0, np.int64) for b in buckets]
    # Every client needs an example: an empty client takes a random one from the (first) largest client.
    for client in range(num_clients):
        if len(parts[client]) == 0:
            donor = int(np.argmax([len(p) for p in parts]))
            j = int(rng.integers(len(parts[donor])))
            parts[client] = parts[donor][j:j + 1]
            parts[donor] = np.delete(parts[donor], j)
    return parts
