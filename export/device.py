"""A phone's side of a round, in Python: what an app does with an exported ``CLIENT_DIR`` (docs/export.md,
"On-device training").

Imports only numpy and LiteRT (``ai-edge-litert``), never TensorFlow, so it runs where a phone's runtime runs and
proves the exported model needs nothing else. The Kotlin equivalent is in ``export/ANDROID.md``.

    python -m export.device --client-dir CLIENT_DIR --data BATCHES.npz --out TRAINED.npz

``BATCHES.npz`` holds ``x`` (``[steps, batch, H, W, C]`` float32 preprocessed as the manifest says, or the
manifest's other input shape and dtype) and ``y`` (``[steps, batch]`` int32, or ``[steps, batch, T]`` for a model
with a label per step: the manifest's ``label.shape``); every step runs ``train`` once, in order. The trained
weights (``get_weights``) are written to ``TRAINED.npz`` for ``python -m export ingest``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def load_interpreter(client_dir: str | Path):
    """LiteRT's interpreter on ``CLIENT_DIR/model.tflite`` with the round's weights set from ``weights.npz``,
    each checked against the manifest's shape and dtype first (``set_weights`` itself checks nothing)."""
    from ai_edge_litert.interpreter import Interpreter

    client_dir = Path(client_dir)
    manifest = json.loads((client_dir / "manifest.json").read_text())
    interpreter = Interpreter(model_path=str(client_dir / "model.tflite"))
    with np.load(client_dir / "weights.npz", allow_pickle=False) as data:
        weights = {name: data[name] for name in data.files}
    for spec in manifest["weights"]:
        value = weights.get(spec["name"])
        if value is None or list(value.shape) != spec["shape"] or str(value.dtype) != spec["dtype"]:
            raise ValueError(f"weights.npz does not match the manifest at '{spec['name']}'")
    interpreter.get_signature_runner("set_weights")(**weights)
    return interpreter, manifest


def train(interpreter, x: np.ndarray, y: np.ndarray, dtype: str = "float32") -> list[float]:
    """One ``train`` call per step of ``x``/``y`` (``[steps, batch, ...]``, ``x`` as ``dtype``: the manifest's
    input dtype, float32 or int32 token ids); returns the losses."""
    step = interpreter.get_signature_runner("train")
    return [float(step(x=np.asarray(xb, dtype), y=np.asarray(yb, np.int32))["loss"])
            for xb, yb in zip(x, y, strict=True)]


def get_weights(interpreter) -> dict[str, np.ndarray]:
    """The model's current weights by exchange name (what ``ingest`` takes)."""
    return {name: np.asarray(value) for name, value in interpreter.get_signature_runner("get_weights")().items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.device", description=__doc__.splitlines()[0])
    parser.add_argument("--client-dir", required=True)
    parser.add_argument("--data", required=True, help=".npz with x [steps, batch, H, W, C] and y [steps, batch] (or "
                        "[steps, batch, T]: a label per step)")
    parser.add_argument("--out", required=True, help="where to write the trained weights (.npz)")
    options = parser.parse_args(argv)
    interpreter, manifest = load_interpreter(options.client_dir)
    with np.load(options.data, allow_pickle=False) as data:
        x, y = data["x"], data["y"]
    losses = train(interpreter, x, y, manifest["input"]["dtype"])
    np.savez(options.out, **get_weights(interpreter))
    print(json.dumps({"client": manifest["client"], "round": manifest["round"], "steps": len(losses),
                      "examples": int(np.prod(y.shape[:2])),  # steps × batch: a sequence's T labels are one example
                      "losses": losses, "tensorflow": "tensorflow" in sys.modules}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
