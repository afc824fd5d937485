"""The small class-folder dataset the tests train on (no download): `make_shapes_dataset`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# 3 classes, 40 train / 12 test images each, 28x28 grayscale.
SHAPES_CLASSES, SHAPES_TRAIN_PER_CLASS, SHAPES_TEST_PER_CLASS, SHAPES_SIDE = 3, 40, 12, 28


def make_shapes_dataset(root: Path) -> Path:
    """Write train/<class>/*.png and test/<class>/*.png under ``root``: 28x28 grayscale noise plus a bright band at
    a class's columns (learnable in a few rounds; decodes in well under a second). Deterministic."""
    from PIL import Image

    rng = np.random.default_rng(1234)
    band = SHAPES_SIDE // SHAPES_CLASSES
    for split, per_class in (("train", SHAPES_TRAIN_PER_CLASS), ("test", SHAPES_TEST_PER_CLASS)):
        for c in range(SHAPES_CLASSES):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                img = rng.integers(0, 90, (SHAPES_SIDE, SHAPES_SIDE), dtype=np.uint8)
                img[:, c * band:(c + 1) * band] += np.uint8(140)
                Image.fromarray(img).save(folder / f"{i:03d}.png")
    return root
