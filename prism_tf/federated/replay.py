"""Any round of a run, rebuilt from its directory without TFF: the server model, each client's `Selection`.

A round ``t`` (1-based, as the run's table numbers them; its 0-based ``round_index`` is ``t − 1``) starts from the
server weights after ``t − 1`` rounds (checkpoint ``t − 1``; round 1 starts from the seeded initial model, which is
rebuilt) and draws its clients (`prism_tf.federated.config.round_clients`) and their selections
(`prism_tf.federated.methods.round_selections`) exactly as the process did. Every file of the run is read through
`prism_tf.federated.rundir.RunDir`. The exporter (`export`) builds device sub-models from it and device ingest
checks uploads against it; nothing here imports TFF or starts a worker.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

import prism_tf
from prism_tf.federated import recipe, sequences
from prism_tf.federated.config import (
    TrainConfig,
    calibration_batches,
    client_budget,
    model_builder,
    round_clients,
    stored_config,
)
from prism_tf.federated.methods import Method, deployed_models, round_selections
from prism_tf.federated.rundir import RunDir, RunError

# Runs from before data_spec.json existed: the built-in dataset's shapes.
_KNOWN_DATA = {"cifar10": {"input_shape": [32, 32, 3], "num_classes": 10}}


def weights_digest(weights: Sequence[np.ndarray]) -> str:
    """SHA-256 over the flat weights' dtypes, shapes and bytes: names the exact server model a round started from."""
    digest = hashlib.sha256()
    for w in weights:
        w = np.ascontiguousarray(w)
        digest.update(f"{w.dtype.str}{w.shape}".encode())
        digest.update(w.tobytes())
    return digest.hexdigest()


class RoundReplay:
    """Round ``round_num`` (1-based) of the run in ``run_dir``: its server model, clients and selections.

    Args:
      run_dir: a run directory (`prism_tf.federated.rundir.RunDir`).
      round_num: 1-based round; default the next round to train (one after the latest checkpoint).

    Raises:
      RunError: no run there, or the checkpoint the round needs is not kept (the run keeps its last few).
    """

    def __init__(self, run_dir: str | os.PathLike[str], round_num: int | None = None) -> None:
        self.run = RunDir(run_dir)
        self.config: TrainConfig = stored_config(self.run)
        spec = self.run.read_data_spec() or _KNOWN_DATA.get(self.config.dataset)
        if spec is None:
            raise RunError(f"{self.run.path} has no data_spec.json (written by runs since it existed); resume the "
                           "run once to write it")
        self.input_shape, self.num_classes = tuple(spec["input_shape"]), int(spec["num_classes"])
        self.vocabulary_size: int | None = spec.get("vocabulary_size")
        self.method, width = self._method()
        model = model_builder(self.config, self.input_shape, self.num_classes, width, self.vocabulary_size)()
        self.server_model = (prism_tf.factorize(model, **self.config.factorize_options()) if self.method.spectral
                             else model)
        self.plan = prism_tf.SubmodelPlan.of(self.server_model)
        self.round_num = self.run.open_round() if round_num is None else int(round_num)
        if self.round_num < 1:
            raise RunError(f"rounds are numbered from 1, got {round_num}")
        if self.round_num > 1:
            saved = self.run.read_server_state(self.round_num - 1, len(self.plan.tensors))
            try:
                prism_tf.submodel.set_flat_weights(self.server_model, saved.weights)
            except ValueError as e:
                raise RunError(f"checkpoint {self.round_num - 1} of {self.run.path} does not match the model its "
                               f"config.json describes ({e}): was config.json edited, or written by another "
                               "version?") from None
            if saved.rounds != self.round_num - 1:
                raise RunError(f"checkpoint {self.round_num - 1} of {self.run.path} holds round {saved.rounds}")
        self.weights = [w.numpy() for w in prism_tf.submodel.flat_weights(self.server_model)]
        self.server_digest = weights_digest(self.weights)
        self._selections: dict[tuple[int, ...], dict[int, prism_tf.Selection]] = {}

    def _method(self) -> tuple[Method, int]:
        """The method the run's server trained (`Method.trained_method`) at its stored budget, and the model width."""
        info = self.run.read_budget()
        if info is not None:
            method = self.config.method_spec().with_budget(info)
            width = method.model_width(info, self.config.width)
        else:  # a run from before budget.json existed: the budget is computed again
            method, width, _ = client_budget(self.config, self.input_shape, self.num_classes, self.vocabulary_size)
        return method.trained_method(), width

    # --- the round -----------------------------------------------------------------------------------------
    @property
    def round_index(self) -> int:
        """The round's 0-based index, ``round_num − 1``: what seeds its participants and selections (the process's
        round counter)."""
        return self.round_num - 1

    def clients(self) -> list[int]:
        """The global ids of the clients the run draws for this round."""
        return round_clients(self.config, self.round_index)

    def singular_values(self) -> dict[str, np.ndarray]:
        """Each principal layer's singular values at the round's server weights (what spectral methods sample)."""
        groups = prism_tf.kinds.kernel_groups(self.server_model)
        return {group: layer.factors(pair).singular_values.numpy() for group, (layer, pair) in groups.items()}

    def selections(self, client_ids: Sequence[int] | None = None) -> dict[int, prism_tf.Selection]:
        """Each client's selection, as the process draws it (default: this round's clients; ``collective``'s ``C``
        counts the clients passed)."""
        ids = self.clients() if client_ids is None else [int(c) for c in client_ids]
        for c in ids:
            if not 0 <= c < self.config.clients:
                raise ValueError(f"client {c} does not exist: the run has clients 0..{self.config.clients - 1}")
        key = tuple(ids)
        if key not in self._selections:  # drawn once per set of clients: the server model does not change
            chosen = round_selections(self.method, self.plan, self.singular_values(), self.config.seed,
                                      self.round_index, ids)
            self._selections[key] = dict(zip(ids, chosen, strict=True))
        return dict(self._selections[key])

    def selection(self, client_id: int) -> prism_tf.Selection:
        """Client ``client_id``'s selection in this round (drawn among the round's clients when it is one of them)."""
        ids = self.clients()
        return self.selections(ids if client_id in ids else [client_id])[int(client_id)]

    def submodel(self, client_id: int) -> tf.keras.Model:
        """Client ``client_id``'s sub-model of this round, with the server's weights (`prism_tf.extract`)."""
        return prism_tf.extract(self.server_model, self.selection(client_id))

    def input_stats(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The run's per-channel input mean and std (``None, None``: pixels / 255 only)."""
        stats = self.run.read_input_stats()
        if stats is None:
            return None, None
        return np.asarray(stats["mean"], np.float32), np.asarray(stats["std"], np.float32)

    def preprocess(self, x: np.ndarray) -> np.ndarray:
        """Raw pixels -> model inputs, as the run's clients and evaluation saw them (`recipe.preprocess`; sequences
        as stored)."""
        if sequences.is_sequence_dataset(self.config.dataset):
            return np.asarray(x)
        return recipe.preprocess(x, *self.input_stats())

    def calibration(self, x_train: np.ndarray) -> list[np.ndarray]:
        """The training batches the run recalibrates BatchNorm statistics on (`--eval-norm recalibrate`)."""
        return calibration_batches(self.config, x_train, self.preprocess)

    def deployed_model(self) -> tf.keras.Model:
        """The model a user of the run's method deploys, at this round's server weights
        (`prism_tf.federated.methods.deployed_models`)."""
        return deployed_models(self.method, self.server_model)["deployed"]

    def learning_rate(self) -> float:
        """The clients' learning rate in this round (the run's schedule at this round, else ``client_lr``)."""
        cfg = self.config
        if cfg.lr_schedule == "constant":
            return float(cfg.client_lr)
        if self.round_num > cfg.rounds:
            # The schedule spans the configured total: `resume --rounds` stretches it, so a rate baked in now
            # would not be the one the run gives this round once extended.
            raise RunError(
                f"round {self.round_num} is past the {cfg.rounds} rounds {self.run.path} is configured for, and "
                f"its {cfg.lr_schedule} learning-rate schedule is defined over that total: extend the run first "
                f"(python -m tff_pipelines resume --out {self.run.path} --rounds {self.round_num} trains up to it), "
                "or start runs meant for devices with --rounds covering every round")
        return float(recipe.Schedule(cfg.lr_schedule, cfg.client_lr, cfg.final_lr, cfg.rounds)(self.round_index))


__all__ = ["RoundReplay", "weights_digest"]
