"""Sizes and train-step times of the exported TFLite training models: a keep-0.2 PriSM sub-model against the full
model, ResNet-18 at widths 16 and 64, builtins and flex runtimes.

    .venv/bin/python bench/export_sizes.py              # make bench-export (about 10 minutes on 2 cores)
    .venv/bin/python bench/export_sizes.py --widths 16  # one width

Every figure of one row is measured in the same process: the file size of the converted model (bytes), and the
median time of ``--steps`` ``train`` calls on batches of 32 after 3 warm-up calls, builtins in LiteRT
(``ai-edge-litert``, as a phone runs it) and flex in TensorFlow's own interpreter (the only one here that has the
Flex delegate). Resumable: finished configurations are kept in ``bench/results/export/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "export"


def measure(width: int, which: str, runtime: str, steps: int, batch: int) -> dict:
    import tensorflow as tf

    import prism_tf
    from export import tflite
    from export.files import npz_bytes

    tf.keras.utils.set_random_seed(0)
    full = prism_tf.models.build_model("resnet18", width=width, num_classes=10, input_shape=(32, 32, 3))
    if which == "full":
        model = full
    else:
        fm = prism_tf.factorize(full)
        model = prism_tf.extract(fm, prism_tf.sample(fm, keep_ratio=0.2, seed=(0, 0, 0)))
    step = tflite.TrainStep(0.01, 0.9, prism_tf.local_step.StepOptions(frobenius_decay=2e-4, weight_decay=5e-4))
    began = time.perf_counter()
    module = tflite.build_training_module(model, step, runtime, batch_size=batch)
    flatbuffer = tflite.convert(module, runtime)
    convert_s = time.perf_counter() - began
    if runtime == "builtins":
        from ai_edge_litert.interpreter import Interpreter

        interpreter, where = Interpreter(model_content=flatbuffer), "ai-edge-litert"
    else:
        interpreter, where = tf.lite.Interpreter(model_content=flatbuffer), "tf.lite.Interpreter (Flex)"
    train = interpreter.get_signature_runner("train")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
    times = []
    for i in range(steps + 3):
        t = time.perf_counter()
        train(x=x, y=y)
        if i >= 3:
            times.append(time.perf_counter() - t)
    cost = prism_tf.cost(model)
    # What a phone that already has the graph downloads each round (export client's weights.npz).
    values = [w.numpy() for w in prism_tf.submodel.flat_weights(model)]
    weights = npz_bytes(dict(zip(tflite.weight_names(model), values, strict=True)))
    return dict(width=width, model=which, runtime=runtime, bytes=len(flatbuffer), weights_npz_bytes=len(weights),
                interpreter=where, load_average_1min=os.getloadavg()[0],
                train_step_ms=1000 * float(np.median(times)), steps=steps, batch=batch, convert_seconds=convert_s,
                params=int(cost["params"]), flops_per_example=float(cost["flops"]))


def write(results: list[dict]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    rows = {(r["width"], r["model"], r["runtime"]): r for r in results}
    lines = ["# Exported TFLite training models: size and train-step time", "",
             "ResNet-18 (CIFAR, 32x32x3), PriSM keep-0.2 sub-model against the full model; one `train` call is one",
             "SGD-with-momentum step with Frobenius and weight decay on a batch of 32. Builtins run in ai-edge-litert,",
             "flex in `tf.lite.Interpreter` (the light runtimes cannot load it). Command:",
             "`.venv/bin/python bench/export_sizes.py`.", "",
             "`weights.npz` is what a phone that already has the graph downloads in a later round. Times are",
             "wall-clock medians on this machine's CPU; the 1-minute load average at each measurement is in",
             "results.json (other work on the machine slows all rows, not only one).", "",
             "| width | model | runtime | model.tflite bytes | vs full | weights.npz bytes | vs full | "
             "train step (ms) | step vs full | flops vs full |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (width, model, runtime), r in sorted(rows.items()):
        full = rows.get((width, "full", runtime))
        ratio = f"{r['bytes'] / full['bytes']:.3f}" if full else "-"
        npz_ratio = f"{r['weights_npz_bytes'] / full['weights_npz_bytes']:.3f}" if full else "-"
        speed = f"{r['train_step_ms'] / full['train_step_ms']:.3f}" if full else "-"
        flops = f"{r['flops_per_example'] / full['flops_per_example']:.3f}" if full else "-"
        lines.append(f"| {width} | {model} | {runtime} | {r['bytes']:,} | {ratio} | {r['weights_npz_bytes']:,} | "
                     f"{npz_ratio} | {r['train_step_ms']:.1f} | "
                     f"{speed} | {flops} |")
    (OUT / "README.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="16,64")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    options = parser.parse_args()
    path = OUT / "results.json"
    results = json.loads(path.read_text()) if path.exists() else []
    done = {(r["width"], r["model"], r["runtime"]) for r in results}
    for width in (int(w) for w in options.widths.split(",")):
        for which in ("sub", "full"):
            for runtime in ("builtins", "flex"):
                if (width, which, runtime) in done:
                    print(f"width {width} {which} {runtime}: kept", flush=True)
                    continue
                r = measure(width, which, runtime, options.steps, options.batch)
                results.append(r)
                write(results)
                print(f"width {width} {which:4} {runtime:8}: {r['bytes']:>11,} bytes, train step "
                      f"{r['train_step_ms']:.1f} ms ({r['interpreter']})", flush=True)
    write(results)
    print(f"results: {OUT}/README.md")
    return 0


if __name__ == "__main__":
    import prism_tf.quiet

    prism_tf.quiet.import_tensorflow()  # TensorFlow without its CPU-only start-up noise
    sys.exit(main())
