"""Import TensorFlow without the start-up lines that mean nothing on a CPU-only machine.

See docs/pitfalls.md, "Start-up noise on a CPU-only machine".

TensorFlow 2.14 logs, while it is imported, C++ notices that a CPU-only user reads as failures: "Unable to register
cuDNN/cuFFT/cuBLAS factory" (at ERROR level, so ``TF_CPP_MIN_LOG_LEVEL=2`` does not hide them), "Could not find
cuda drivers", the oneDNN and CPU-instruction notices and the TensorRT warning. They are written by C++ straight
to file descriptor 2, so the only way to drop them is to read that descriptor during the import: every other line
is passed on unchanged, so real warnings and errors still show. TensorFlow's notices that one of its functions
used by Keras or TFF internally is deprecated are filtered from its logger too.
"""

from __future__ import annotations

import os
import re
import sys
import threading

NOISE = re.compile(
    r"Unable to register cu(DNN|FFT|BLAS) factory|Could not find cuda drivers|TF-TRT Warning: Could not find TensorRT"
    r"|oneDNN custom operations are on|This TensorFlow binary is optimized to use available CPU instructions"
    r"|^To enable the following instructions:.*rebuild TensorFlow with the appropriate compiler flags")


def import_tensorflow() -> None:
    """Import TensorFlow once, dropping its CPU-only start-up noise from stderr (see the module docstring)."""
    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real stderr (an embedded interpreter)
        import tensorflow  # noqa: F401

        return
    read_end, write_end = os.pipe()
    chunks: list[bytes] = []
    reader = threading.Thread(target=_drain, args=(read_end, chunks), daemon=True)
    reader.start()
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        import tensorflow as tf

        # TensorFlow's own notices about its internals (Keras 2.14 calling deprecated TF functions while it builds
        # BatchNorm in a graph, ...) say nothing a user of this project can act on.
        tf.get_logger().addFilter(_drop_internal_deprecations)
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        reader.join(timeout=10)
        kept = [line for line in b"".join(chunks).decode(errors="replace").splitlines(keepends=True)
                if not NOISE.search(line)]
        if kept:
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


def _drop_internal_deprecations(record) -> bool:
    return "is deprecated and will be removed" not in record.getMessage()


def _drain(fd: int, chunks: list[bytes]) -> None:
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        while chunk := pipe.read(65536):
            chunks.append(chunk)
