"""Writing export artifacts: atomically (a file that exists is complete) and in the formats devices read."""

from __future__ import annotations

import io

import numpy as np

from prism_tf.federated.rundir import write_atomic

__all__ = ["npz_bytes", "write_atomic"]


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """``np.savez`` of ``arrays`` into memory (uncompressed: a phone reads it with any .npy reader)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()
