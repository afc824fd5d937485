"""The local training recipe of the PriSM authors, as small pure pieces (Niu et al., TMLR 2023, §5 setup).

- `Schedule` / `cosine_lr`: the client learning rate of a round (cosine over rounds down to 1e-4);
- `augment_example` / `augment_dataset`: random pad-4-and-crop plus horizontal flip, deterministic for a seed;
- `channel_stats` / `normalize`: per-channel input normalization.

TensorFlow only (no TFF): the augmentation uses stateless random ops, so a client's augmented dataset is a pure
function of its seed, also when TFF serializes the dataset into a computation.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import numpy as np
import tensorflow as tf

SCHEDULES = ("constant", "cosine")


def cosine_lr(round_index: int, total_rounds: int, base_lr: float, final_lr: float = 1e-4) -> float:
    """Cosine-annealed learning rate of the round of index ``round_index`` (0-based) out of ``total_rounds``.

    ``final + (base − final)·(1 + cos(π·t/(T − 1)))/2``: round 0 trains at ``base_lr`` and the last round
    (``T − 1``) exactly at ``final_lr``; rounds past the end stay at ``final_lr``. (PyTorch's ``CosineAnnealingLR``
    with ``T_max = T``, which the authors step once per round, reaches ``eta_min`` one round later.)
    """
    if total_rounds < 1:
        raise ValueError(f"total_rounds must be >= 1, got {total_rounds}")
    if round_index < 0:
        raise ValueError(f"round_index must be >= 0, got {round_index}")
    if total_rounds == 1:
        return float(base_lr)
    progress = min(round_index, total_rounds - 1) / (total_rounds - 1)
    return float(final_lr + (base_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress)))


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A per-round learning rate: ``Schedule("cosine", base=0.1, final=1e-4, total_rounds=T)(t)``.

    ``constant`` ignores ``final`` and ``total_rounds``. Any ``Callable[[int], float]`` serves where a schedule is
    expected (`tff_pipelines.build_prism_process`'s ``lr_schedule``).
    """

    kind: str = "constant"
    base: float = 0.1
    final: float = 1e-4
    total_rounds: int = 1

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule kind must be one of {SCHEDULES}, got {self.kind!r}")
        if self.base < 0 or self.final < 0:
            raise ValueError(f"learning rates must be >= 0, got base={self.base}, final={self.final}")
        if self.total_rounds < 1:
            raise ValueError(f"total_rounds must be >= 1, got {self.total_rounds}")

    def __call__(self, round_index: int) -> float:
        """The learning rate of the round of index ``round_index`` (0-based)."""
        if self.kind == "constant":
            return float(self.base)
        return cosine_lr(round_index, self.total_rounds, self.base, self.final)


# --- augmentation ---------------------------------------------------------------------------------------------
def crop_and_flip(image: tf.Tensor, top: tf.Tensor, left: tf.Tensor, flip: tf.Tensor, pad: int = 4) -> tf.Tensor:
    """Zero-pad ``image`` ``[H, W, C]`` by ``pad`` on each side, crop ``H×W`` at ``(top, left)``, mirror if ``flip``.

    ``top = left = pad`` and ``flip = False`` give the image back; ``top = pad + 1`` shifts it up by one row.
    """
    image = tf.convert_to_tensor(image)
    height, width, channels = image.shape
    padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    cropped = tf.slice(padded, tf.stack([top, left, 0]), [height, width, channels])
    return tf.where(flip, tf.reverse(cropped, axis=[1]), cropped)


def augment_params(seed: tf.Tensor, pad: int = 4) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """The crop offsets ``(top, left)`` in ``[0, 2·pad]`` and the flip bit drawn from a ``[2]`` integer seed."""
    u = tf.random.stateless_uniform([3], seed=seed)
    offsets = tf.minimum(tf.cast(tf.floor(u[:2] * (2 * pad + 1)), tf.int32), 2 * pad)
    return offsets[0], offsets[1], u[2] < 0.5


def augment_example(x: tf.Tensor, seed: tf.Tensor, pad: int = 4) -> tf.Tensor:
    """Random pad-``pad``-and-crop plus horizontal flip of one ``[H, W, C]`` image (the CIFAR recipe).

    Deterministic for the ``[2]`` integer ``seed`` (``tf.random.stateless_*``); shape and dtype are kept.
    """
    top, left, flip = augment_params(seed, pad)
    return crop_and_flip(x, top, left, flip, pad)


def augment_dataset(ds: tf.data.Dataset, seed: int, pad: int = 4) -> tf.data.Dataset:
    """Map unbatched ``OrderedDict(x, y)`` elements through `augment_example` (batch afterwards).

    Element ``i`` uses the stateless seed ``[seed, i]`` (``Dataset.enumerate``), so the dataset is a pure function
    of ``seed``: give each client and round its own, e.g. `client_seed` ``(run seed, round, client)``, and every
    iteration of the dataset (also inside a TFF computation) yields the same images.
    """
    base = tf.constant(int(seed), tf.int64)

    def augment(index, element):
        out = collections.OrderedDict(element)
        out["x"] = augment_example(element["x"], tf.stack([base, index]), pad)
        return out

    return ds.enumerate().map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def client_seed(run_seed: int, round_index: int, client: int) -> int:
    """A 63-bit augmentation seed for ``client`` in the round of index ``round_index`` (0-based) of a run
    (independent of the sampling streams)."""
    sequence = np.random.SeedSequence([int(run_seed), int(round_index), int(client), 0xA06])
    return int(sequence.generate_state(1, np.uint64)[0] >> np.uint64(1))


# --- normalization --------------------------------------------------------------------------------------------
def channel_stats(x: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (population) standard deviation of images ``[..., C]``, as float32 ``[C]``.

    ``uint8`` pixels are measured on the ``[0, 1]`` scale client datasets use (``x / 255``, `prism_tf.federated.data`);
    floats as given. Accumulated in float64 over chunks of the first axis, so 50,000 CIFAR images need no copy.
    """
    x = np.asarray(x)
    scale = 1.0 / 255.0 if x.dtype == np.uint8 else 1.0
    flat = x.reshape(-1, x.shape[-1])
    total = np.zeros(flat.shape[1])
    squares = np.zeros(flat.shape[1])
    for start in range(0, flat.shape[0], chunk):
        block = flat[start:start + chunk].astype(np.float64) * scale
        total += block.sum(axis=0)
        squares += np.square(block).sum(axis=0)
    count = max(flat.shape[0], 1)
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - np.square(mean), 0.0))
    return mean.astype(np.float32), std.astype(np.float32)


def normalize(x: tf.Tensor, mean: np.ndarray, std: np.ndarray) -> tf.Tensor:
    """``(x − mean) / std`` per channel (last axis), in float32; ``uint8`` pixels are first scaled by 1/255 as in
    `channel_stats`, so stats measured on either form of the same images apply to both."""
    x = tf.convert_to_tensor(x)
    x = tf.cast(x, tf.float32) / 255.0 if x.dtype == tf.uint8 else tf.cast(x, tf.float32)
    return (x - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def preprocess(x: np.ndarray, mean: np.ndarray | None, std: np.ndarray | None) -> np.ndarray:
    """Raw pixels -> model inputs as a run's clients see them: `normalize` with the run's per-channel statistics,
    or only the 1/255 scaling (``mean is None``, a run without ``--normalize channel``)."""
    if mean is None:
        from prism_tf.federated.data import to_float

        return to_float(x)
    return normalize(x, mean, std).numpy()
