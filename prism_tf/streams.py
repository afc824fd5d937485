"""Named random streams: one independent, reproducible generator per random choice of a run.

Every random choice of this project draws from its own stream, named by what it decides::

    rng((run_seed, round, client), KERNELS, layer_name)   # one layer's principal kernels (README, "Use it")
    rng((run_seed, round, client), CHANNELS, group)       # one channel group's kept channels (output_keep, dropout)
    rng((run_seed, client_id), CAPACITY)                  # a device's keep ratio: fixed for the whole run
    rng((run_seed, round, client), FJORD_WIDTH)           # FjORD's per-round width (ordered dropout)

A stream is ``np.random.SeedSequence(seed, spawn_key=(h(name_1), h(name_2), ...))`` where ``h`` is a 64-bit
BLAKE2b hash of each name (strings and integers hashed apart, so ``"3"`` and ``3`` differ) with its top bit set
(every key word has the same length, so different name tuples never assemble the same entropy). Keys are therefore
labels, not positions: adding a layer or a new kind of choice leaves every other stream's draws unchanged, and
no stream coincides with a positional ``SeedSequence.spawn(n)[i]`` child (whose keys are small integers).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

SeedLike = int | Sequence[int] | np.random.SeedSequence
Name = str | int

KERNELS, CHANNELS, CAPACITY, FJORD_WIDTH = "kernels", "channels", "capacity", "fjord_width"

_TOP_BIT = 1 << 63


def name_key(name: Name) -> int:
    """The 64-bit spawn-key word of one stream name (top bit set; strings and integers in separate domains)."""
    if isinstance(name, bool) or not isinstance(name, str | int | np.integer):
        raise TypeError(f"stream names are str or int, got {type(name).__name__} {name!r}")
    tag = b"s:" + name.encode("utf-8") if isinstance(name, str) else b"i:" + str(int(name)).encode("ascii")
    return int.from_bytes(hashlib.blake2b(tag, digest_size=8).digest(), "little") | _TOP_BIT


def seed_sequence(seed: SeedLike, *names: Name) -> np.random.SeedSequence:
    """The `SeedSequence` of the stream ``names`` under ``seed`` (an int, a sequence of ints or a `SeedSequence`).

    ``seed_sequence(seed, a, b)`` equals ``seed_sequence(seed_sequence(seed, a), b)``: names compose like paths.
    """
    keys = tuple(name_key(n) for n in names)
    if isinstance(seed, np.random.SeedSequence):
        return np.random.SeedSequence(seed.entropy, spawn_key=(*seed.spawn_key, *keys))
    entropy = int(seed) if isinstance(seed, int | np.integer) else [int(s) for s in seed]
    return np.random.SeedSequence(entropy, spawn_key=keys)


def rng(seed: SeedLike, *names: Name) -> np.random.Generator:
    """A `np.random.Generator` for the stream ``names`` under ``seed`` (see the module docstring)."""
    return np.random.default_rng(seed_sequence(seed, *names))


__all__ = ["CAPACITY", "CHANNELS", "FJORD_WIDTH", "KERNELS", "SeedLike", "name_key", "rng", "seed_sequence"]
