"""Compression of a trained model for deployment (issue 27): rank truncation, post-training int8 and
quantization-aware int8, against file size, multiply-adds, LiteRT latency and test accuracy in LiteRT.

    .venv/bin/python bench/compress.py --prism RUN --fedavg RUN    # resumable; prints progress
    .venv/bin/python bench/compress.py --report-only               # rewrite README.md and the plot from results.json

For each run (a trained PriSM run and, for contrast, a FedAvg run: the latter's kernels are factorized by SVD at
export, `export.model.deployable_model`):

1. float rows, one `export.sweep.truncation_sweep` file each: the full model, every ``--rank-keeps`` share and every
   ``--energies`` energy. Per row: .tflite bytes, parameters and multiply-adds (`prism_tf.cost`), LiteRT latency
   (median of ``--repeats`` invokes at batch 1 and 32, reported as a ratio to the full model of the same run: the
   machine is shared, so absolute times are under load), and top-1 accuracy in LiteRT on the whole test set.
2. int8 rows at full rank and at the recommended rank (the smallest float file within 1 pp of the full model):
   post-training full-integer quantization (`export model --int8`) and quantization-aware fine-tuning before it
   (`export model --int8 --qat STEPS`).

Every accuracy is checked by a second path: a float file's LiteRT accuracy against the Keras model it was converted
from (same images; must agree within ``--float-tolerance``, 0.2 pp), the full model's also against the accuracy the
run itself recorded in its metrics (TFF's evaluation); an int8 file is scored again, from disk, in TensorFlow's own
``tf.lite.Interpreter`` (its int8 kernels are not LiteRT's build: they may round a requantization differently,
so a few images of 10,000 may differ; the README gives the largest difference), and a QAT file's accuracy is
shown beside the fake-quantized Keras model's. A failed check is printed and recorded (``checks`` in
results.json), never hidden.

Resumable: each row is stored in ``results.json`` as soon as it is measured; a re-run skips stored rows. The
``.tflite`` files go to ``--files`` (default ``bench/runs/compress``, not committed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "compress"
FILES = ROOT / "bench" / "runs" / "compress"


def shown(path: str | Path) -> str:
    """``path`` as results record it: relative to this checkout, or from its ``bench/runs/...`` part when it is a run
    of these benches in another checkout; never a machine's absolute path where one of those applies."""
    path = Path(path).absolute()
    if path.is_relative_to(ROOT):
        return str(path.relative_to(ROOT))
    parts = path.parts
    for i in range(len(parts) - 1):
        if parts[i:i + 2] == ("bench", "runs"):
            return str(Path(*parts[i:]))
    return str(path)
RANK_KEEPS = (1.0, 0.75, 0.5, 0.35, 0.25, 0.15)
ENERGIES = (0.99, 0.95, 0.9, 0.8)
LOSS_BUDGET = 0.01  # the recommended rank: the smallest file within 1 pp of the full model


def _log(line: str) -> None:
    print(line, flush=True)


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"rows": {}}


def _save(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=False))
    os.replace(tmp, path)


def _setting_flags(rule: str, value: float | None) -> list[str]:
    return [] if rule == "full" else [f"--{rule.replace('_', '-')}", f"{value:g}"]


def _key(label: str, rule: str, value: float | None, variant: str) -> str:
    return f"{label}/{rule}{'' if value is None else f'_{value:g}'}/{variant}"


def _recorded_accuracy(run: Path) -> tuple[int, float] | None:
    """The run's own last evaluation (round, accuracy) from its metrics.jsonl (TFF's evaluation)."""
    last = None
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("eval_accuracy") is not None:
            last = (int(row["round"]), float(row["eval_accuracy"]))
    return last


def _tf_interpreter_accuracy(path: Path, x, y, batch_size: int = 500) -> float:
    """Top-1 accuracy of a .tflite file read from disk, in TensorFlow's own interpreter (not LiteRT's package)."""
    import tensorflow as tf

    from export.model import tflite_accuracy

    return tflite_accuracy(path.read_bytes(), x, y, batch_size, interpreter_class=tf.lite.Interpreter)


def float_row(label: str, run: Path, rule: str, value: float | None, options: argparse.Namespace) -> dict:
    from export.sweep import truncation_sweep

    began = time.perf_counter()
    (row,) = truncation_sweep(run, Path(options.files) / label, full=rule == "full",
                              energies=[value] if rule == "energy" else [],
                              rank_keeps=[value] if rule == "rank_keep" else [], eval_examples=None,
                              batch_sizes=(1, 32), repeats=options.repeats)
    record = dataclasses.asdict(row)
    record["path"] = shown(row.path)
    record["latency"] = {str(b): s for b, s in row.latency.items()}
    record["seconds"] = time.perf_counter() - began
    record["command"] = shlex.join(["python", "-m", "export", "model", "--run", shown(run), "--format", "tflite",
                                    *_setting_flags(rule, value), "--eval-examples", "-1", "--out", shown(row.path)])
    difference = abs(row.accuracy - row.keras_accuracy)
    record["checks"] = {"litert_vs_keras_pp": 100 * difference,
                        "litert_vs_keras_ok": difference <= options.float_tolerance / 100 + 1e-12}
    if rule == "full":
        recorded = _recorded_accuracy(run)
        if recorded is not None:
            record["checks"].update(run_recorded_round=recorded[0], run_recorded_accuracy=recorded[1],
                                    litert_vs_run_pp=100 * abs(row.accuracy - recorded[1]))
    return record


def int8_row(label: str, run: Path, rule: str, value: float | None, qat: int | None, options: argparse.Namespace,
             test: tuple) -> dict:
    import numpy as np

    from export.model import export_model
    from export.sweep import tflite_latency

    name = f"{rule}{'' if value is None else f'_{value:g}'}_{'qat' if qat else 'ptq'}_int8.tflite"
    path = Path(options.files) / label / name
    began = time.perf_counter()
    result = export_model(run, path, fmt="tflite", int8=True, representative=options.representative,
                          eval_examples=None, qat=qat, qat_learning_rate=options.qat_lr, log=_log,
                          energy=value if rule == "energy" else None,
                          rank_keep=value if rule == "rank_keep" else None)
    flatbuffer = path.read_bytes()
    example = np.random.default_rng(0).uniform(0, 255, size=test[0].shape[1:]).astype(np.float32)
    latency = {str(b): tflite_latency(flatbuffer, example, b, repeats=options.repeats) for b in (1, 32)}
    record = dataclasses.asdict(result)
    record.pop("truncation", None)
    record["path"] = shown(path)
    record.update(latency=latency, seconds=time.perf_counter() - began, command=shlex.join(
        ["python", "-m", "export", "model", "--run", shown(run), "--format", "tflite", "--int8",
         "--representative", str(options.representative), *_setting_flags(rule, value),
         *(["--qat", str(qat), "--qat-lr", f"{options.qat_lr:g}"] if qat else []), "--eval-examples", "-1",
         "--out", shown(path)]))
    again = _tf_interpreter_accuracy(path, *test)
    record["checks"] = {"tf_interpreter_accuracy": again,
                        "tf_interpreter_pp": 100 * abs(again - result.exported_accuracy),
                        "float_litert_vs_keras_pp": 100 * abs(result.float_tflite_accuracy - result.keras_accuracy)}
    if qat:
        record["checks"]["litert_vs_fake_quantized_keras_pp"] = 100 * (result.exported_accuracy
                                                                        - result.qat_keras_accuracy)
    return record


def recommended(rows: dict, label: str) -> tuple[str, float | None] | None:
    """The smallest float file of ``label`` within `LOSS_BUDGET` of its full model (``None`` before rows exist)."""
    full = rows.get(_key(label, "full", None, "float"))
    if full is None:
        return None
    fine = [r for k, r in rows.items() if k.startswith(f"{label}/") and k.endswith("/float")
            and r["accuracy"] >= full["accuracy"] - LOSS_BUDGET - 1e-12]
    best = min(fine, key=lambda r: (r["bytes"], -r["accuracy"]))
    return ("full", None) if best["bytes"] >= full["bytes"] else (best["rule"], best["value"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prism", help="a finished PriSM run directory")
    parser.add_argument("--fedavg", help="a finished FedAvg run directory (the contrast)")
    parser.add_argument("--out", default=str(OUT), help="results.json, README.md and the plot")
    parser.add_argument("--files", default=str(FILES), help="where the .tflite files go")
    parser.add_argument("--rank-keeps", default=",".join(f"{v:g}" for v in RANK_KEEPS))
    parser.add_argument("--energies", default=",".join(f"{v:g}" for v in ENERGIES))
    parser.add_argument("--repeats", type=int, default=30, help="invokes per latency median")
    parser.add_argument("--representative", type=int, default=200, help="calibration images of the int8 conversion")
    parser.add_argument("--qat", type=int, default=200, help="quantization-aware fine-tuning steps")
    parser.add_argument("--qat-lr", type=float, default=1e-4)
    parser.add_argument("--float-tolerance", type=float, default=0.2, help="pp allowed between LiteRT and Keras")
    parser.add_argument("--report-only", action="store_true", help="only rewrite README.md and the plot")
    options = parser.parse_args(argv)
    out = Path(options.out)
    path = out / "results.json"
    results = _load(path)
    if not options.report_only:
        runs = {label: Path(run) for label, run in (("prism", options.prism), ("fedavg", options.fedavg)) if run}
        if not runs:
            parser.error("give --prism RUN and/or --fedavg RUN (or --report-only)")
        for run in runs.values():
            if not (run / "summary.json").exists():
                parser.error(f"{run} is not a finished run (no summary.json)")
        measure(results, path, runs, options)
    from compress_report import write_report  # bench/compress_report.py (beside this script)

    write_report(results, out)
    _log(f"wrote {out / 'README.md'} and {out / 'accuracy_vs_size.png'}")
    return 0


def measure(results: dict, path: Path, runs: dict[str, Path], options: argparse.Namespace) -> None:
    from prism_tf.quiet import import_tensorflow

    import_tensorflow()
    import numpy as np

    from prism_tf.federated.data import load_dataset
    from prism_tf.federated.replay import RoundReplay

    results.setdefault("rows", {})
    results.setdefault("commands", [])
    command = shlex.join(["python", "bench/compress.py",
                          *(shown(a) if os.path.exists(a) else a for a in sys.argv[1:])])
    if command not in results["commands"]:
        results["commands"].append(command)
    rows = results["rows"]
    rank_keeps = [float(v) for v in options.rank_keeps.split(",") if v]
    energies = [float(v) for v in options.energies.split(",") if v]
    began = time.perf_counter()
    for label, run in runs.items():
        replay = RoundReplay(run)
        results.setdefault("runs", {})[label] = {
            "path": shown(run), "method": replay.config.method, "model": replay.config.model,
            "width": replay.config.width, "rounds": replay.config.rounds, "round": replay.round_num - 1,
            "dataset": replay.config.dataset}
        settings = [("full", None)] + [("rank_keep", v) for v in rank_keeps] + [("energy", v) for v in energies]
        for i, (rule, value) in enumerate(settings, 1):
            key = _key(label, rule, value, "float")
            if key in rows:
                continue
            _log(f"[{label} float {i}/{len(settings)}] {rule} {'' if value is None else f'{value:g}'} "
                 f"({time.perf_counter() - began:.0f} s into this session)")
            rows[key] = float_row(label, run, rule, value, options)
            r = rows[key]
            _log(f"  {r['bytes'] / 1e6:.3f} MB, {r['flops'] / 1e6:.1f} M multiply-adds, LiteRT {r['accuracy']:.4f} "
                 f"(Keras {r['keras_accuracy']:.4f}), batch-1 {1e3 * r['latency']['1']:.2f} ms, "
                 f"{r['seconds']:.0f} s{'' if r['checks']['litert_vs_keras_ok'] else '  CHECK FAILED'}")
            _save(path, results)
        dataset = load_dataset(replay.config.dataset, data=replay.config.data, progress=False)
        test = (dataset.x_test.astype(np.float32), dataset.y_test)
        best = recommended(rows, label)
        results["runs"][label]["recommended"] = {"rule": best[0], "value": best[1]}
        int8_settings = [("full", None)] + ([best] if best != ("full", None) else [])
        for rule, value in int8_settings:
            for variant, qat in (("ptq_int8", None), ("qat_int8", options.qat)):
                key = _key(label, rule, value, variant)
                if key in rows:
                    continue
                _log(f"[{label} {variant}] {rule} {'' if value is None else f'{value:g}'} "
                     f"({time.perf_counter() - began:.0f} s into this session)")
                rows[key] = int8_row(label, run, rule, value, qat, options, test)
                r = rows[key]
                _log(f"  {r['bytes'] / 1e6:.3f} MB, LiteRT int8 {r['exported_accuracy']:.4f} (float "
                     f"{r['float_tflite_accuracy']:.4f}), tf.lite again {r['checks']['tf_interpreter_accuracy']:.4f}"
                     f", {r['seconds']:.0f} s")
                _save(path, results)
        _save(path, results)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
