"""Size, multiply-adds, LiteRT latency and accuracy of a run's deployed model against its truncation rank
(docs/export.md, "Picking a rank"): the rows of the bench table of issue 27, one `export_model` per setting.

    rows = truncation_sweep("runs/prism", "out/prism_sweep", energies=(0.8, 0.9, 0.95, 0.99), int8=False)

Needs no TFF. Each row is one written TFLite file, scored in LiteRT like any `export model` output.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from export.model import export_model


def tflite_latency(flatbuffer: bytes, example: np.ndarray, batch_size: int, *, repeats: int = 20,
                   warmup: int = 3, threads: int = 1) -> float:
    """Median wall-clock seconds of one LiteRT ``invoke`` on ``batch_size`` copies of ``example`` (one input,
    without its batch axis), after ``warmup`` invokes, with ``threads`` interpreter threads."""
    from ai_edge_litert.interpreter import Interpreter

    if batch_size < 1 or repeats < 1:
        raise ValueError(f"batch_size and repeats must be >= 1, got {batch_size}, {repeats}")
    interpreter = Interpreter(model_content=flatbuffer, num_threads=int(threads))
    detail = interpreter.get_input_details()[0]
    batch = np.repeat(np.asarray(example, detail["dtype"])[np.newaxis], int(batch_size), axis=0)
    interpreter.resize_tensor_input(detail["index"], batch.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(detail["index"], batch)
    for _ in range(int(warmup)):
        interpreter.invoke()
    times = []
    for _ in range(int(repeats)):
        start = time.perf_counter()
        interpreter.invoke()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


@dataclasses.dataclass
class SweepRow:
    """One setting of `truncation_sweep`: ``rule`` is ``full`` (no truncation), ``energy`` or ``rank_keep``."""

    rule: str
    value: float | None
    path: str
    bytes: int
    params: int
    flops: int
    accuracy: float | None
    keras_accuracy: float | None
    latency: dict[int, float]  # batch size -> median seconds per invoke
    layers_factorized: int = 0
    layers_plain: int = 0


def truncation_sweep(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    energies: Sequence[float] = (),
    rank_keeps: Sequence[float] = (),
    full: bool = True,
    int8: bool = False,
    round_num: int | None = None,
    eval_examples: int | None = None,
    batch_sizes: Sequence[int] = (1, 32),
    repeats: int = 20,
    criterion: str = "params",
) -> list[SweepRow]:
    """Export the run's model as TFLite untruncated (``full``), at each energy and at each rank share, to
    ``out_dir`` and measure each file: bytes, parameters and multiply-adds (`prism_tf.cost`), test accuracy in
    LiteRT on ``eval_examples`` test images (``None``: all), and LiteRT latency at each of ``batch_sizes``.

    A run trained whole (FedAvg) is factorized, then truncated the same way (`export.model.deployable_model`).
    """
    out_dir = Path(out_dir)
    settings = ([("full", None)] if full else []) + [("energy", float(e)) for e in energies] + [
        ("rank_keep", float(f)) for f in rank_keeps]
    rows = []
    for rule, value in settings:
        suffix = "" if value is None else f"_{value:g}"
        path = out_dir / f"{rule}{suffix}{'_int8' if int8 else ''}.tflite"
        result = export_model(run_dir, path, fmt="tflite", round_num=round_num, int8=int8,
                              eval_examples=eval_examples, criterion=criterion,
                              energy=value if rule == "energy" else None,
                              rank_keep=value if rule == "rank_keep" else None)
        flatbuffer = path.read_bytes()
        from ai_edge_litert.interpreter import Interpreter

        shape = Interpreter(model_content=flatbuffer).get_input_details()[0]["shape"][1:]
        example = np.random.default_rng(0).uniform(0, 255, size=tuple(shape)).astype(np.float32)
        latency = {int(b): tflite_latency(flatbuffer, example, int(b), repeats=repeats) for b in batch_sizes}
        forms = [layer["form"] for layer in (result.truncation or {}).get("layers", [])]
        rows.append(SweepRow(rule, value, str(path), result.bytes, result.params, result.flops,
                             result.exported_accuracy, result.keras_accuracy, latency,
                             forms.count("factorized"), forms.count("plain")))
    return rows


__all__ = ["SweepRow", "tflite_latency", "truncation_sweep"]
