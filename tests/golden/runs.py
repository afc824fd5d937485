"""Fixed-seed tiny runs of every method and one export/ingest round, through the user's commands only.

Recorded once before the floor-plan refactor (`python tests/golden/record.py`, values in this folder); the test
`tests/test_golden.py` runs the same commands and compares what they write: ``metrics.jsonl`` (every column but the
wall-clock ones) and the weights of the saved ``model.keras``. Only command lines and written files are used here,
so the golden values hold whatever the code's inner layout.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
METHODS = ("prism", "fedavg", "small", "heterofl", "fjord", "fed_dropout", "fedhm", "fedrolex")
# Wall-clock columns differ run to run.
TIMING = {"round_seconds", "mean_round_seconds"}


def train_flags(data: Path, method: str) -> list[str]:
    """A 2-round run of ``method`` at tiny sizes on the shapes dataset (about 10 s of training)."""
    return ["train", "--method", method, "--dataset", str(data), "--model", "resnet18", "--width", "4",
            "--clients", "4", "--clients-per-round", "2", "--rounds", "2", "--batch-size", "8",
            "--eval-examples", "12", "--eval-every", "1", "--calibration-examples", "16", "--seed", "3"]


def _run(module: str, args: list[str]) -> str:
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=900)
    if proc.returncode:
        raise RuntimeError(f"python -m {module} {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def run_method(data: Path, method: str, out: Path) -> dict:
    """``python -m tff_pipelines train`` for ``method``; its metrics and final model weights."""
    _run("tff_pipelines", [*train_flags(data, method), "--out", str(out)])
    return outputs(out)


def outputs(out: Path, model_file: Path | None = None) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [{k: v for k, v in row.items() if k not in TIMING} for row in rows]
    return {"metrics": rows, "weights": keras_weights(model_file or out / "model.keras")}


def keras_weights(path: Path) -> list[np.ndarray]:
    import tensorflow as tf

    model = tf.keras.models.load_model(path, compile=False)
    return [np.asarray(w) for w in model.get_weights()]


def export_round(data: Path, base: Path) -> dict:
    """A constant-rate PriSM run of 2 rounds; round 3 played by two phones through `python -m export` and
    `python -m export.device` (LiteRT), finished with ``finish-round``; the round-3 model exported as Keras."""
    run = base / "run"
    flags = [*train_flags(data, "prism"), "--lr-schedule", "constant", "--out", str(run)]
    _run("tff_pipelines", flags)
    rng = np.random.default_rng(5)
    for client in (0, 1):
        client_dir = base / f"client_{client}"
        _run("export", ["client", "--run", str(run), "--client", str(client), "--round", "3", "--out",
                        str(client_dir)])
        batches = base / f"batches_{client}.npz"
        np.savez(batches, x=rng.normal(size=(3, 8, 28, 28, 1)).astype(np.float32),
                 y=rng.integers(0, 3, (3, 8)).astype(np.int32))
        trained = base / f"trained_{client}.npz"
        _run("export.device", ["--client-dir", str(client_dir), "--data", str(batches), "--out", str(trained)])
        _run("export", ["ingest", "--run", str(run), "--client-dir", str(client_dir), "--weights", str(trained),
                        "--examples", "24"])
    _run("export", ["finish-round", "--run", str(run)])
    model = base / "round3.keras"
    _run("export", ["model", "--run", str(run), "--round", "3", "--out", str(model), "--eval-examples", "0"])
    return outputs(run, model)


def save(results: dict[str, dict], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps({k: v["metrics"] for k, v in results.items()}, indent=1) + "\n")
    np.savez_compressed(folder / "weights.npz", **{f"{k}/{i}": w for k, v in results.items()
                                                   for i, w in enumerate(v["weights"])})


def load(folder: Path) -> dict[str, dict]:
    metrics = json.loads((folder / "metrics.json").read_text())
    out = {k: {"metrics": rows, "weights": []} for k, rows in metrics.items()}
    with np.load(folder / "weights.npz") as data:
        for key in sorted(data.files, key=lambda k: (k.split("/")[0], int(k.split("/")[1]))):
            name, _ = key.split("/")
            out[name]["weights"].append(data[key])
    return out
