"""Tests for prism_tf.federated.data: loading (shared CIFAR-10 archive, synthetic class folders), cache, errors,
partitions; and the partitions as TFF ClientData (tff_pipelines.program.client_data.make_client_data)."""

from __future__ import annotations

import collections
import io
import os
import tarfile
import time
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from PIL import Image

from prism_tf.federated import data as D
from prism_tf.federated.data import (
    CIFAR10_CLASSES,
    DataError,
    ImageDataset,
    find_cifar10,
    load_dataset,
    partition,
    to_float,
)
from tff_pipelines.program.client_data import make_client_data

# ----------------------------------------------------------------------------------------- helpers


def write_image(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array[:, :, 0] if array.shape[-1] == 1 else array)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        img.save(path, quality=95)
    else:
        img.save(path)


def make_tree(
    root: Path,
    counts: dict[str, dict[str, int]],
    *,
    shape: tuple[int, int, int] = (28, 28, 1),
    ext: str = ".png",
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Create root/<split>/<class>/img_XXX<ext>; returns {relative path: array written}."""
    rng = np.random.default_rng(seed)
    written = {}
    for split, classes in counts.items():
        for cls, n in classes.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
                rel = f"{split}/{cls}/img_{i:03d}{ext}"
                write_image(root / rel, arr)
                written[rel] = arr
    return written


def make_archive(src: Path, out: Path, top: str | None) -> Path:
    """Tar `src`'s contents, either at the archive root (top=None) or under one folder `top`."""
    mode = "w:gz" if out.name.endswith(("gz", ".tgz")) else "w"
    with tarfile.open(out, mode) as tar:
        if top:
            tar.add(src, arcname=top)
        else:
            for child in sorted(os.listdir(src)):
                tar.add(src / child, arcname=child)
    return out


def pil_decode(path_or_bytes: Path | bytes) -> np.ndarray:
    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with Image.open(src) as im:
        arr = np.asarray(im)
    return arr[:, :, None] if arr.ndim == 2 else arr


GRAY_COUNTS = {"train": {"b": 4, "a": 3, "c": 5}, "test": {"c": 2, "a": 2, "b": 1}}
RGB_COUNTS = {"train": {"dog": 3, "cat": 4}, "test": {"cat": 2, "dog": 2}}


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


# ----------------------------------------------------------------------------------------- real CIFAR-10


@pytest.fixture(scope="module")
def cifar() -> tuple[str, ImageDataset, float]:
    path = find_cifar10()
    if path is None or not os.path.isfile(path):
        pytest.skip(
            "shared CIFAR-10 archive not found: no $PRISM_DATA and no shared/data/cifar10-jpg.tar.gz above "
            f"{os.getcwd()} or the package directory"
        )
    t0 = time.perf_counter()
    ds = load_dataset("cifar10", progress=False)  # default cache dir: the 60k decode happens once per machine
    seconds = time.perf_counter() - t0
    print(f"\nCIFAR-10 first load this session (decode or cache): {seconds:.1f} s")
    return path, ds, seconds


def test_cifar10_counts_shapes_classes(cifar: tuple[str, ImageDataset, float]) -> None:
    path, ds, _ = cifar
    assert ds.source == os.path.realpath(path)
    assert ds.x_train.shape == (50_000, 32, 32, 3) and ds.x_train.dtype == np.uint8
    assert ds.x_test.shape == (10_000, 32, 32, 3) and ds.x_test.dtype == np.uint8
    assert ds.y_train.dtype == np.int32 and ds.y_test.dtype == np.int32
    assert ds.class_names == CIFAR10_CLASSES
    assert ds.input_shape == (32, 32, 3) and ds.num_classes == 10
    assert np.bincount(ds.y_train).tolist() == [5000] * 10
    assert np.bincount(ds.y_test).tolist() == [1000] * 10
    assert 100 < ds.x_train.mean() < 160  # real photos, not zeros


def test_cifar10_cached_load_is_fast_and_identical(cifar: tuple[str, ImageDataset, float]) -> None:
    _, ds, _ = cifar
    t0 = time.perf_counter()
    again = load_dataset("cifar10", progress=False)
    seconds = time.perf_counter() - t0
    print(f"\nCIFAR-10 cached load: {seconds:.2f} s")
    assert seconds < 2.0
    assert np.array_equal(again.x_train, ds.x_train) and np.array_equal(again.y_train, ds.y_train)
    assert np.array_equal(again.x_test, ds.x_test) and np.array_equal(again.y_test, ds.y_test)
    assert again.class_names == ds.class_names


def test_cifar10_pixels_equal_direct_pil_decode(cifar: tuple[str, ImageDataset, float]) -> None:
    path, ds, _ = cifar
    wanted = {"cifar10/train/cat/0123.jpg": None, "cifar10/test/ship/0007.jpg": None}
    with tarfile.open(path, "r|gz") as tar:
        for member in tar:
            if member.name in wanted:
                wanted[member.name] = tar.extractfile(member).read()
                if all(v is not None for v in wanted.values()):
                    break
    # Sorted by class, then file name: cat is class 3 (5000 train each), ship class 8 (1000 test each).
    assert np.array_equal(ds.x_train[3 * 5000 + 123], pil_decode(wanted["cifar10/train/cat/0123.jpg"]))
    assert ds.y_train[3 * 5000 + 123] == CIFAR10_CLASSES.index("cat")
    assert np.array_equal(ds.x_test[8 * 1000 + 7], pil_decode(wanted["cifar10/test/ship/0007.jpg"]))
    assert ds.y_test[8 * 1000 + 7] == CIFAR10_CLASSES.index("ship")


def test_cifar10_client_data(cifar: tuple[str, ImageDataset, float]) -> None:
    _, ds, _ = cifar
    parts = partition(ds.y_train, 10, "dirichlet:0.5", seed=1, examples_per_client=200)
    cd = make_client_data(ds, 10, "dirichlet:0.5", seed=1, examples_per_client=200)
    first = list(cd.create_tf_dataset_for_client("3").take(5).as_numpy_iterator())
    np.testing.assert_array_equal(np.stack([e["x"] for e in first]), to_float(ds.x_train[parts[3][:5]]))
    assert [int(e["y"]) for e in first] == ds.y_train[parts[3][:5]].tolist()
    assert sum(1 for _ in cd.create_tf_dataset_for_client("3")) == len(parts[3]) <= 200
    assert "x=float32[32,32,3]" in str(cd.dataset_computation.type_signature)  # traceable for TFF


# ----------------------------------------------------------------------------------------- synthetic folders


def test_grayscale_png_directory(tmp_path: Path, cache: Path) -> None:
    root = tmp_path / "gray"
    written = make_tree(root, GRAY_COUNTS, shape=(28, 28, 1), ext=".png")
    ds = load_dataset(str(root), cache_dir=cache, progress=False)
    assert ds.class_names == ("a", "b", "c")
    assert ds.source == os.path.realpath(root)
    assert ds.x_train.shape == (12, 28, 28, 1) and ds.x_test.shape == (5, 28, 28, 1)
    assert ds.input_shape == (28, 28, 1) and ds.num_classes == 3
    assert ds.y_train.tolist() == [0] * 3 + [1] * 4 + [2] * 5
    assert ds.y_test.tolist() == [0, 0, 1, 2, 2]
    # PNG is lossless: every pixel comes back; order is class, then file name.
    assert np.array_equal(ds.x_train[3 + 2], written["train/b/img_002.png"])
    assert np.array_equal(ds.x_test[4], written["test/c/img_001.png"])
    # Cached as one .npz (no temp files left), and the cached copy is identical.
    assert [p.suffix for p in cache.iterdir()] == [".npz"]
    again = load_dataset(str(root), cache_dir=cache, progress=False)
    assert np.array_equal(again.x_train, ds.x_train) and again.class_names == ds.class_names


@pytest.mark.parametrize(
    ("archive_name", "top"),
    [("rgb.tar.gz", None), ("rgb.tar.gz", "mydata"), ("rgb.tgz", "mydata"), ("rgb.tar", None)],
)
def test_rgb_jpg_archive(tmp_path: Path, cache: Path, archive_name: str, top: str | None) -> None:
    src = tmp_path / "src"
    make_tree(src, RGB_COUNTS, shape=(24, 40, 3), ext=".jpg")  # 40 wide, 24 high
    archive = make_archive(src, tmp_path / archive_name, top)
    ds = load_dataset(str(archive), cache_dir=cache, progress=False)
    assert ds.class_names == ("cat", "dog")
    assert ds.x_train.shape == (7, 24, 40, 3) and ds.x_test.shape == (4, 24, 40, 3)
    assert ds.y_train.tolist() == [0, 0, 0, 0, 1, 1, 1] and ds.y_test.tolist() == [0, 0, 1, 1]
    assert ds.source == os.path.realpath(archive)
    assert np.array_equal(ds.x_train[4 + 1], pil_decode(src / "train/dog/img_001.jpg"))
    # The same images loaded from the directory give the same arrays.
    from_dir = load_dataset(str(src), cache_dir=cache, progress=False)
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert np.array_equal(getattr(ds, name), getattr(from_dir, name))


def test_directory_with_one_top_level_folder(tmp_path: Path, cache: Path) -> None:
    make_tree(tmp_path / "outer" / "inner", GRAY_COUNTS)
    ds = load_dataset(str(tmp_path / "outer"), cache_dir=cache, progress=False)
    assert ds.x_train.shape == (12, 28, 28, 1) and ds.class_names == ("a", "b", "c")


def test_ignores_hidden_and_non_image_files(tmp_path: Path, cache: Path) -> None:
    root = tmp_path / "d"
    make_tree(root, GRAY_COUNTS)
    (root / "train" / "a" / ".DS_Store").write_bytes(b"junk")
    (root / "train" / "a" / "notes.txt").write_text("not an image")
    (root / "README.md").write_text("readme")
    ds = load_dataset(str(root), cache_dir=cache, progress=False)
    assert len(ds.x_train) == 12


def test_cache_follows_source_changes(tmp_path: Path, cache: Path) -> None:
    root = tmp_path / "d"
    make_tree(root, GRAY_COUNTS)
    assert len(load_dataset(str(root), cache_dir=cache, progress=False).x_train) == 12
    write_image(root / "train" / "a" / "img_new.png", np.zeros((28, 28, 1), np.uint8))
    assert len(load_dataset(str(root), cache_dir=cache, progress=False).x_train) == 13

    archive = make_archive(root, tmp_path / "d.tar.gz", None)
    assert len(load_dataset(str(archive), cache_dir=cache, progress=False).x_train) == 13
    (root / "train" / "a" / "img_new.png").unlink()
    make_archive(root, archive, None)  # rewritten in place: new size/mtime
    assert len(load_dataset(str(archive), cache_dir=cache, progress=False).x_train) == 12


def test_damaged_cache_is_rebuilt(tmp_path: Path, cache: Path) -> None:
    root = tmp_path / "d"
    make_tree(root, GRAY_COUNTS)
    ds = load_dataset(str(root), cache_dir=cache, progress=False)
    (cache_file,) = cache.iterdir()
    cache_file.write_bytes(cache_file.read_bytes()[:1000])  # as if truncated
    with pytest.warns(UserWarning, match="unreadable cache"):
        again = load_dataset(str(root), cache_dir=cache, progress=False)
    assert np.array_equal(again.x_train, ds.x_train)
    assert np.array_equal(np.load(cache_file)["x_train"], ds.x_train)  # rewritten whole


def test_default_cache_dir_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "d"
    make_tree(root, GRAY_COUNTS)
    monkeypatch.setenv("PRISM_CACHE", str(tmp_path / "envcache"))
    load_dataset(str(root), progress=False)
    assert len(list((tmp_path / "envcache").glob("*.npz"))) == 1


# ----------------------------------------------------------------------------------------- errors


def test_missing_path(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(DataError, match="not found: .*nowhere"):
        load_dataset(str(tmp_path / "nowhere"), cache_dir=cache)


def test_missing_split_folder(tmp_path: Path, cache: Path) -> None:
    make_tree(tmp_path / "d", {"train": {"a": 1}})
    with pytest.raises(DataError, match="no test/ folder"):
        load_dataset(str(tmp_path / "d"), cache_dir=cache)
    (tmp_path / "e" / "images").mkdir(parents=True)
    with pytest.raises(DataError, match="no train/ or test/ folder"):
        load_dataset(str(tmp_path / "e"), cache_dir=cache)


@pytest.mark.parametrize("as_archive", [False, True])
def test_empty_class_folder_is_named(tmp_path: Path, cache: Path, as_archive: bool) -> None:
    src = tmp_path / "d"
    make_tree(src, GRAY_COUNTS)
    (src / "train" / "zebra").mkdir()
    (src / "train" / "zebra" / "readme.txt").write_text("no images here")
    (src / "test" / "zebra").mkdir()
    target = make_archive(src, tmp_path / "d.tar.gz", "d") if as_archive else src
    with pytest.raises(DataError, match="empty class folder train/zebra"):
        load_dataset(str(target), cache_dir=cache, progress=False)


@pytest.mark.parametrize("as_archive", [False, True])
def test_corrupt_image_is_named(tmp_path: Path, cache: Path, as_archive: bool) -> None:
    src = tmp_path / "d"
    make_tree(src, RGB_COUNTS, shape=(24, 40, 3), ext=".jpg")
    good = (src / "train" / "dog" / "img_000.jpg").read_bytes()
    (src / "train" / "dog" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    target = make_archive(src, tmp_path / "d.tar.gz", None) if as_archive else src
    with pytest.raises(DataError, match=r"cannot decode image .*train/dog/truncated\.jpg"):
        load_dataset(str(target), cache_dir=cache, progress=False)
    (src / "train" / "dog" / "truncated.jpg").unlink()
    (src / "test" / "cat" / "garbage.png").write_bytes(b"this is not a png")
    target = make_archive(src, tmp_path / "d2.tar.gz", None) if as_archive else src
    with pytest.raises(DataError, match=r"cannot decode image .*test/cat/garbage\.png"):
        load_dataset(str(target), cache_dir=cache, progress=False)


def test_mismatched_size_or_mode_is_named(tmp_path: Path, cache: Path) -> None:
    src = tmp_path / "d"
    make_tree(src, GRAY_COUNTS)
    write_image(src / "train" / "b" / "wide.png", np.zeros((28, 30, 1), np.uint8))
    with pytest.raises(DataError, match=r"train/b/wide\.png is 30x28 grayscale but .* is 28x28 grayscale"):
        load_dataset(str(src), cache_dir=cache, progress=False)
    (src / "train" / "b" / "wide.png").unlink()
    write_image(src / "test" / "c" / "colour.png", np.zeros((28, 28, 3), np.uint8))
    with pytest.raises(DataError, match=r"test/c/colour\.png is 28x28 RGB but .* is 28x28 grayscale"):
        load_dataset(str(src), cache_dir=cache, progress=False)


def test_class_sets_must_match(tmp_path: Path, cache: Path) -> None:
    make_tree(tmp_path / "d", {"train": {"a": 1, "b": 1}, "test": {"a": 1, "c": 1}})
    with pytest.raises(DataError, match="only in train/: b; only in test/: c"):
        load_dataset(str(tmp_path / "d"), cache_dir=cache, progress=False)


def test_unsupported_or_broken_archive(tmp_path: Path, cache: Path) -> None:
    zipped = tmp_path / "data.zip"
    zipped.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(DataError, match=r"unsupported dataset file: .*data\.zip"):
        load_dataset(str(zipped), cache_dir=cache)
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(os.urandom(2000))
    with pytest.raises(DataError, match=r"cannot read archive .*broken\.tar\.gz"):
        load_dataset(str(broken), cache_dir=cache, progress=False)
    no_layout = tmp_path / "flat"
    write_image(no_layout / "x" / "img.png", np.zeros((4, 4, 1), np.uint8))
    with pytest.raises(DataError, match="no train/ or test/ folder in archive"):
        flat = make_archive(no_layout, tmp_path / "flat.tar", None)
        load_dataset(str(flat), cache_dir=cache, progress=False)


# ----------------------------------------------------------------------------------------- finding CIFAR-10


def test_find_cifar10_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A folder name of this test's own: a real shared/ beside the checkout (CI's /tmp/shared, say) is out of play.
    relative = f"shared-{tmp_path.name}/data/cifar10-jpg.tar.gz"
    monkeypatch.setattr(D, "SHARED_CIFAR10", PurePosixPath(relative))
    shared = tmp_path / relative
    shared.parent.mkdir(parents=True)
    shared.write_bytes(b"")
    clone = tmp_path / "clone" / "sub"
    clone.mkdir(parents=True)
    monkeypatch.delenv("PRISM_DATA", raising=False)
    monkeypatch.chdir(clone)
    assert find_cifar10() == str(shared)  # found next to the checkout, from the working directory up
    monkeypatch.setenv("PRISM_DATA", "/env/cifar")
    assert find_cifar10() == "/env/cifar"
    assert find_cifar10("/explicit/cifar") == "/explicit/cifar"
    # Nothing anywhere: None (the package directory is moved out of reach of any shared/ folder too).
    monkeypatch.delenv("PRISM_DATA")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    shared.unlink()
    monkeypatch.setattr(D, "__file__", str(tmp_path / "pkg" / "tff_pipelines" / "data.py"))
    assert find_cifar10() is None


def test_explicit_missing_cifar10_path_fails_instead_of_downloading(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_dataset("cifar10", data=str(tmp_path / "missing.tar.gz"), cache_dir=cache)


def test_cifar10_data_argument_loads_that_copy(tmp_path: Path, cache: Path) -> None:
    make_tree(tmp_path / "mini", GRAY_COUNTS)
    ds = load_dataset("cifar10", data=str(tmp_path / "mini"), cache_dir=cache, progress=False)
    assert ds.class_names == ("a", "b", "c") and len(ds.x_train) == 12


def test_keras_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x_tr, x_te = (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for n in (20, 10))
    y_tr, y_te = (rng.integers(0, 10, (n, 1), dtype=np.uint8) for n in (20, 10))  # Keras: uint8 [N, 1]
    calls = []

    def fake_load_data():
        calls.append(1)
        return (x_tr, y_tr), (x_te, y_te)

    monkeypatch.setattr(D, "find_cifar10", lambda data=None: None)
    monkeypatch.setattr(tf.keras.datasets.cifar10, "load_data", fake_load_data)
    ds = load_dataset("cifar10", progress=False)
    assert calls == [1] and ds.source == "keras download"
    assert ds.class_names == CIFAR10_CLASSES
    assert ds.y_train.dtype == np.int32 and ds.y_train.shape == (20,)
    assert np.array_equal(ds.y_test, y_te[:, 0]) and np.array_equal(ds.x_train, x_tr)


# ----------------------------------------------------------------------------------------- partitions

BLOCK_LABELS = np.repeat(np.arange(10), 100)  # 10 classes x 100, sorted into equal blocks


def assert_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    allidx = np.concatenate(parts)
    assert len(allidx) == n and np.array_equal(np.sort(allidx), np.arange(n))


def test_iid_balanced_disjoint_covering() -> None:
    parts = partition(BLOCK_LABELS, 7, "iid", seed=3)
    assert sorted(len(p) for p in parts) == [142] * 1 + [143] * 6
    assert_disjoint_cover(parts, 1000)
    assert all(p.dtype == np.int64 for p in parts)
    # Random, not contiguous blocks: each client sees (nearly) all classes.
    assert min(len(np.unique(BLOCK_LABELS[p])) for p in parts) >= 9


@pytest.mark.parametrize("scheme", ["iid", "dirichlet:0.5", "shards:2"])
def test_partition_is_deterministic_per_seed(scheme: str) -> None:
    a = partition(BLOCK_LABELS, 10, scheme, seed=7)
    b = partition(BLOCK_LABELS, 10, scheme, seed=7)
    c = partition(BLOCK_LABELS, 10, scheme, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def mean_max_class_fraction(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    return float(np.mean([np.bincount(labels[p]).max() / len(p) for p in parts]))


def test_dirichlet_skew_depends_on_alpha() -> None:
    labels = np.repeat(np.arange(10), 500)
    skewed = partition(labels, 20, "dirichlet:0.1", seed=0)
    uniform = partition(labels, 20, "dirichlet:100", seed=0)
    for parts in (skewed, uniform):
        assert_disjoint_cover(parts, 5000)
        assert min(len(p) for p in parts) >= 1
    s, u = mean_max_class_fraction(labels, skewed), mean_max_class_fraction(labels, uniform)
    print(f"\nmean per-client max-class fraction: dirichlet:0.1 {s:.3f}, dirichlet:100 {u:.3f} (iid = 0.1)")
    assert s > 0.45 and u < 0.2 and s > 3 * u


def test_dirichlet_gives_every_client_an_example() -> None:
    labels = np.repeat(np.arange(4), 30)  # 120 examples, 100 clients, extreme skew
    for seed in range(5):
        parts = partition(labels, 100, "dirichlet:0.01", seed=seed)
        assert min(len(p) for p in parts) >= 1
        assert_disjoint_cover(parts, 120)


def test_shards_limit_classes_per_client() -> None:
    parts = partition(BLOCK_LABELS, 50, "shards:2", seed=0)  # 100 shards of 10, each within one class block
    assert_disjoint_cover(parts, 1000)
    assert all(len(p) == 20 for p in parts)
    classes = [len(np.unique(BLOCK_LABELS[p])) for p in parts]
    assert max(classes) <= 2 and 2 in classes


def test_examples_per_client_caps_deterministically() -> None:
    for scheme in ("iid", "dirichlet:0.3", "shards:3"):
        full = partition(BLOCK_LABELS, 8, scheme, seed=1)
        capped = partition(BLOCK_LABELS, 8, scheme, seed=1, examples_per_client=30)
        assert all(len(c) == min(30, len(f)) for c, f in zip(capped, full, strict=True))
        # each capped client holds a subset of its uncapped data
        assert all(set(c) <= set(f) for c, f in zip(capped, full, strict=True))
        again = partition(BLOCK_LABELS, 8, scheme, seed=1, examples_per_client=30)
        assert all(np.array_equal(x, y) for x, y in zip(capped, again, strict=True))


@pytest.mark.parametrize(
    ("scheme", "clients", "kwargs", "message"),
    [
        ("random", 4, {}, "unknown partition scheme 'random'"),
        ("iid:3", 4, {}, "unknown partition scheme"),
        ("dirichlet", 4, {}, "is not a number"),
        ("dirichlet:abc", 4, {}, "is not a number"),
        ("dirichlet:0", 4, {}, "alpha must be a positive number"),
        ("dirichlet:-1", 4, {}, "alpha must be a positive number"),
        ("dirichlet:nan", 4, {}, "alpha must be a positive number"),
        ("shards:0", 4, {}, "k must be >= 1"),
        ("shards:two", 4, {}, "is not an integer"),
        ("iid", 1001, {}, "too many clients for the data: 1001 clients but 1000"),
        ("shards:2", 501, {}, "too many clients for the data: 501 clients x 2 shards"),
        ("iid", 0, {}, "num_clients must be a positive integer"),
        ("iid", 4, {"examples_per_client": 0}, "examples_per_client must be a positive integer"),
    ],
)
def test_bad_partition_arguments(scheme: str, clients: int, kwargs: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        partition(BLOCK_LABELS, clients, scheme, **kwargs)


# ----------------------------------------------------------------------------------------- ClientData


@pytest.fixture(scope="module")
def small_ds() -> ImageDataset:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (120, 8, 6, 3), dtype=np.uint8)
    x[0, 0, 0, 0], x[1, 0, 0, 0] = 0, 255
    return ImageDataset(
        x_train=x,
        y_train=np.repeat(np.arange(5, dtype=np.int32), 24),
        x_test=x[:10],
        y_test=np.zeros(10, np.int32),
        class_names=tuple("abcde"),
        source="test",
    )


def test_to_float() -> None:
    out = to_float(np.array([0, 51, 255], np.uint8))
    assert out.dtype == np.float32 and out.tolist() == pytest.approx([0.0, 0.2, 1.0])


def test_client_data_ids_spec_and_contents(small_ds: ImageDataset) -> None:
    import tensorflow as tf

    cd = make_client_data(small_ds, 4, "iid", seed=2, examples_per_client=25)
    parts = partition(small_ds.y_train, 4, "iid", seed=2, examples_per_client=25)
    assert cd.client_ids == ["0", "1", "2", "3"]
    assert cd.element_type_structure == collections.OrderedDict(
        x=tf.TensorSpec((8, 6, 3), tf.float32), y=tf.TensorSpec((), tf.int32)
    )
    for cid in cd.client_ids:
        elems = list(cd.create_tf_dataset_for_client(cid).as_numpy_iterator())
        idx = parts[int(cid)]
        assert len(elems) == len(idx) == 25
        x = np.stack([e["x"] for e in elems])
        assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
        np.testing.assert_array_equal(x, to_float(small_ds.x_train[idx]))
        assert [int(e["y"]) for e in elems] == small_ds.y_train[idx].tolist()
    # Traced use (graph mode, string tensor ids), as TFF does it: all clients together hold 4 x 25 examples.
    assert sum(1 for _ in cd.create_tf_dataset_from_all_clients(seed=0)) == 100
    assert "x=float32[8,6,3]" in str(cd.dataset_computation.type_signature)


def test_client_data_non_iid_sizes(small_ds: ImageDataset) -> None:
    cd = make_client_data(small_ds, 6, "dirichlet:0.2", seed=5)
    parts = partition(small_ds.y_train, 6, "dirichlet:0.2", seed=5)
    sizes = [sum(1 for _ in cd.create_tf_dataset_for_client(c)) for c in cd.client_ids]
    assert sizes == [len(p) for p in parts] and sum(sizes) == 120 and min(sizes) >= 1
    labels = np.concatenate(
        [[int(e["y"]) for e in cd.create_tf_dataset_for_client(c)] for c in cd.client_ids]
    )
    assert np.array_equal(np.sort(labels), small_ds.y_train)


def test_client_data_rejects_bad_scheme(small_ds: ImageDataset) -> None:
    with pytest.raises(DataError, match="unknown partition scheme"):
        make_client_data(small_ds, 3, "pathological")
