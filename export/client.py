"""One client's sub-model of one round, as a phone takes it: ``model.tflite``, ``weights.npz``, ``manifest.json``.

docs/export.md, "Client sub-models". The round is replayed from the run directory (`prism_tf.federated.replay`): the
server weights the round starts from and the client's `Selection`, drawn exactly as the simulated process draws
it. The sub-model (`prism_tf.extract`) becomes a TFLite training model (`export.tflite`) whose ``train``
signature takes the run's local step at this round's learning rate.

Files of ``CLIENT_DIR``:

- ``model.tflite``: signatures ``train`` (x, y → loss), ``infer`` (x → logits), ``get_weights``, ``set_weights``;
  the round's weights are its initial values. Clients of one sub-model size share the graph (``size_key``), so a
  phone that has it needs only ``weights.npz`` in later rounds.
- ``weights.npz``: the same weights by exchange name (what ``set_weights`` takes).
- ``manifest.json``: what the device and the server check (`MANIFEST_FIELDS`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import tensorflow as tf

import prism_tf
from export import tflite
from export.files import npz_bytes, write_atomic
from prism_tf.federated.replay import RoundReplay

MANIFEST_FORMAT = "prism-tf/client-round"
MANIFEST_VERSION = 1
MANIFEST_FIELDS = ("format", "version", "run_id", "round", "client", "size_key", "selection", "input", "label",
                   "batch_size", "local_epochs", "optimizer", "runtime", "weights", "server_weights_sha256", "files")


def train_step(replay: RoundReplay) -> tflite.TrainStep:
    """The run's local step at this round (`tff_pipelines.round.client_work.ClientTraining` as the driver builds it)."""
    cfg = replay.config
    return tflite.TrainStep(replay.learning_rate(), cfg.client_momentum, cfg.step_options())


def size_key(submodel: tf.keras.Model) -> str:
    """Identifies the sub-model's graph: the hash of its weights' names and shapes (same for every client whose
    sub-model has the same sizes)."""
    names = tflite.weight_names(submodel)
    shapes = [tuple(w.shape) for w in prism_tf.submodel.flat_weights(submodel)]
    return hashlib.sha256(json.dumps([names, shapes]).encode()).hexdigest()[:16]


@dataclasses.dataclass
class ClientExport:
    """What `export_client` wrote."""

    directory: str
    manifest: dict[str, Any]
    model_bytes: int
    weights_bytes: int

    def report(self) -> str:
        m = self.manifest
        return (f"wrote {self.directory}: client {m['client']}, round {m['round']}, runtime {m['runtime']}; "
                f"model.tflite {self.model_bytes:,} bytes (graph + weights), weights.npz {self.weights_bytes:,} "
                "bytes (what a phone that has this sub-model size downloads per round); "
                f"lr {m['optimizer']['learning_rate']:.5g}")


def export_client(
    run_dir: str | os.PathLike[str],
    client: int,
    out: str | os.PathLike[str],
    *,
    round_num: int | None = None,
    runtime: str = "builtins",
) -> ClientExport:
    """Write client ``client``'s sub-model of round ``round_num`` (1-based; default the next round to train).

    Raises:
      prism_tf.federated.rundir.RunError: no such run, or the round's checkpoint is gone.
      ValueError: an unknown client or runtime, a layer the runtime cannot train (named), or a finished round (its
        updates would be refused).
    """
    replay = RoundReplay(run_dir, round_num)
    open_round = replay.run.open_round()
    if replay.round_num < open_round:
        raise ValueError(f"round {replay.round_num} of {replay.run.path} is finished (its open round is {open_round}): "
                         "an update trained on it would be refused; export the open round (omit --round)")
    round_export = client_round(replay, int(client), runtime)
    files = client_files(round_export, training_model(replay, round_export, runtime))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("model.tflite", "weights.npz", "manifest.json"):  # the manifest last: it names the others
        write_atomic(out / name, files[name])
    manifest = json.loads(files["manifest.json"])
    return ClientExport(str(out), manifest, len(files["model.tflite"]), len(files["weights.npz"]))


def training_model(replay: RoundReplay, round_export: ClientRound, runtime: str = "builtins") -> bytes:
    """The TFLite training model (flatbuffer) of ``round_export``'s sub-model with its round's step.

    Clients whose manifests have the same `graph_key` get the same graph, so one file serves them all: the
    weights in it are only initial values, which ``set_weights`` (from ``weights.npz``) replaces.
    """
    module = tflite.build_training_module(round_export.submodel, round_export.step, runtime,
                                          batch_size=replay.config.batch_size)
    return tflite.convert(module, runtime)


def graph_key(manifest: dict[str, Any]) -> str:
    """What identifies a client's ``model.tflite`` graph: its sub-model sizes (``size_key``), the step baked into
    it (optimizer and learning rate, which a schedule changes every round), the runtime and the batch size."""
    return hashlib.sha256(json.dumps([manifest["size_key"], manifest["optimizer"], manifest["runtime"],
                                      manifest["batch_size"]], sort_keys=True).encode()).hexdigest()[:16]


def client_files(round_export: ClientRound, flatbuffer: bytes) -> dict[str, bytes]:
    """The three files of a client's round, as bytes: ``model.tflite`` (``flatbuffer``, from `training_model`),
    ``weights.npz`` and ``manifest.json`` (its ``files`` naming the other two's sizes and SHA-256)."""
    weights_file = npz_bytes(round_export.weights)
    manifest = {**round_export.manifest,
                "files": {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                          for name, data in (("model.tflite", flatbuffer), ("weights.npz", weights_file))}}
    return {"model.tflite": flatbuffer, "weights.npz": weights_file,
            "manifest.json": json.dumps(manifest, indent=2).encode()}


@dataclasses.dataclass
class ClientRound:
    """What a client is sent for a round, before its TFLite model is built: the sub-model, the local step, the
    weights by exchange name, and the manifest (its ``files`` still empty)."""

    submodel: tf.keras.Model
    step: tflite.TrainStep
    weights: dict[str, Any]
    manifest: dict[str, Any]


def client_round(replay: RoundReplay, client: int, runtime: str = "builtins") -> ClientRound:
    """Client ``client``'s sub-model, step, weights and manifest in the round ``replay`` rebuilds (no TFLite)."""
    selection = replay.selection(int(client))
    submodel = prism_tf.extract(replay.server_model, selection)
    step = train_step(replay)
    names = tflite.weight_names(submodel)
    values = [w.numpy() for w in prism_tf.submodel.flat_weights(submodel)]
    trainable = {v.ref() for v in submodel.trainable_weights}
    plan = prism_tf.SubmodelPlan.of(replay.server_model)
    travels = [t.travels for t in plan.tensors]
    mean, std = replay.input_stats()
    manifest = {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "run_id": replay.run.run_id(),
        "round": replay.round_num, "client": int(client), "size_key": size_key(submodel),
        "selection": selection.to_dict(),
        "input": {"shape": list(replay.input_shape), "dtype": submodel.inputs[0].dtype.name,
                  "preprocessing": {"scale": "pixels / 255", "mean": None if mean is None else mean.tolist(),
                                    "std": None if std is None else std.tolist()}},
        "label": {"dtype": "int32", "classes": replay.num_classes,
                  "shape": [int(d) for d in submodel.outputs[0].shape[1:-1]]},  # [] or [T]: a label per step
        "batch_size": replay.config.batch_size, "local_epochs": replay.config.local_epochs,
        "optimizer": {"name": "sgd_momentum", "learning_rate": step.learning_rate, "momentum": step.momentum,
                      **dataclasses.asdict(step.options)},
        "runtime": runtime,
        "weights": [{"name": n, "shape": list(v.shape), "dtype": str(v.dtype), "trainable": w.ref() in trainable,
                     "uploaded": bool(t)}
                    for n, v, w, t in zip(names, values, prism_tf.submodel.flat_weights(submodel), travels,
                                          strict=True)],
        "server_weights_sha256": replay.server_digest,
        "files": {},
    }
    return ClientRound(submodel, step, dict(zip(names, values, strict=True)), manifest)


def read_manifest(client_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``CLIENT_DIR/manifest.json``, checked for the fields and format this version writes.

    Raises:
      ValueError: missing, not JSON, another format or version, or a field missing.
    """
    path = Path(client_dir) / "manifest.json"
    if not path.is_file():
        raise ValueError(f"{path} is missing: not an exported client directory")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not a prism-tf client manifest")
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{path} has manifest version {manifest.get('version')!r}; this prism-tf reads "
                         f"version {MANIFEST_VERSION}")
    missing = [f for f in MANIFEST_FIELDS if f not in manifest]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}")
    return manifest


__all__ = ["ClientExport", "ClientRound", "MANIFEST_FIELDS", "client_files", "client_round", "export_client",
           "graph_key", "read_manifest", "size_key", "train_step", "training_model"]
