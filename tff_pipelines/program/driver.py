"""Simulation driver: data, model, process, rounds, evaluation, checkpoints — the body of ``train``/``resume``."""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

import prism_tf
from prism_tf import evaluation
from prism_tf.federated import data as data_lib
from prism_tf.federated import methods as methods_lib
from prism_tf.federated import recipe, sequences
from prism_tf.federated.config import (
    AUGMENTS,
    LEGACY_DEFAULTS,
    MATCHES,
    NORMALIZE,
    SERVER_OPTIMIZERS,
    TrainConfig,
    calibration_batches,
    check_model_fits,
    client_budget,
    input_recipe,
    is_sequence_data,
    model_builder,
    parse_keep_mix,
    round_clients,
    stored_config,
)
from prism_tf.federated.replay import RoundReplay
from prism_tf.federated.rundir import RunDir, RunError
from tff_pipelines.program.client_data import make_client_data
from tff_pipelines.round.process import PrismProcess, build_prism_process

# The run's options and budget live in `prism_tf.federated.config` (no TFF); they stay importable from here.
__all__ = ["AUGMENTS", "LEGACY_DEFAULTS", "MATCHES", "NORMALIZE", "SERVER_OPTIMIZERS", "RunDir", "RunError",
           "Simulation", "TrainConfig",
           "client_budget", "evaluate", "load_data", "load_run", "model_builder", "parse_keep_mix", "resume",
           "round_clients", "start", "stored_config"]


def load_data(config: TrainConfig, *, progress: bool = False) -> data_lib.ImageDataset | sequences.SequenceDataset:
    """The run's dataset: a sequence dataset when ``--dataset`` names one (``imdb``, ``python_source``,
    ``shakespeare``, a ``.npz``, a folder of ``.txt`` files: `prism_tf.federated.sequences.is_sequence_dataset`),
    else an image dataset (`prism_tf.federated.data.load_dataset`)."""
    if config.dataset == "shakespeare":
        from tff_pipelines.program.shakespeare import load_shakespeare

        return load_shakespeare(length=config.sequence_length or sequences.DEFAULT_LENGTH["text"])
    if sequences.is_sequence_dataset(config.dataset):
        return sequences.load_sequences(config.dataset, length=config.sequence_length, clients=config.clients)
    return data_lib.load_dataset(config.dataset, data=config.data, progress=progress)


def evaluate(model: tf.keras.Model, x: np.ndarray, y: np.ndarray, batch_size: int = 500, norm: str = "moving",
             **options) -> tuple[float, float]:
    """`prism_tf.evaluation.evaluate` with the driver's input scaling (kept for callers of the old name)."""
    return evaluation.evaluate(model, x, y, batch_size=batch_size, norm=norm, **options)


class Simulation:
    """A run: its data, process and run directory."""

    def __init__(self, config: TrainConfig, out: str, *, log: Callable[[str], None] = print) -> None:
        config.validate()
        self.config, self.run, self.log = config, RunDir(out), log
        self.dataset = load_data(config, progress=sys.stderr.isatty())
        check_model_fits(config, self.dataset)
        self.image_options = input_recipe(config, self.dataset)  # augment, normalize: the config's or the dataset's
        self.sequences = is_sequence_data(self.dataset)
        # Token models' embedding rows (None for images and feature frames).
        self.vocabulary_size = getattr(self.dataset, "vocabulary_size", 0) or None
        self.client_data = make_client_data(
            self.dataset, config.clients, config.partition, seed=config.seed,
            examples_per_client=config.examples_per_client)
        # Per-channel input statistics of the training set (the standard CIFAR constants, measured): clients and
        # evaluation normalize with the same numbers, which are stored with the run for whoever deploys it.
        self.input_mean, self.input_std = (recipe.channel_stats(self.dataset.x_train)
                                           if self.image_options["normalize"] == "channel" else (None, None))
        shape, classes = self.dataset.input_shape, self.dataset.num_classes
        method, width, self.budget = client_budget(config, shape, classes, self.vocabulary_size)
        self.model_width = width
        self._method = method.trained_method()  # what the server trains (`small`: its narrower model, whole)
        reference = model_builder(config, shape, classes, vocabulary_size=self.vocabulary_size)()
        self.reference_cost = prism_tf.cost(reference)
        # The loaded test set is ordered by class: a prefix would be one class. Take a seeded random subset (in
        # random order; `prism_tf.evaluation.evaluate` does not depend on the order anyway).
        n_test = min(config.eval_examples or len(self.dataset.x_test), len(self.dataset.x_test))
        chosen = np.random.default_rng([config.seed, 2]).permutation(len(self.dataset.x_test))[:n_test]
        self.x_test, self.y_test = self.dataset.x_test[chosen], self.dataset.y_test[chosen]
        self._calibration: list[np.ndarray] | None = None
        self._eval_models: dict[str, tf.keras.Model] = {}

    @functools.cached_property
    def process(self) -> PrismProcess:
        """The TFF process, built on first use (tracing its computations takes a while; data-only uses skip it)."""
        from tff_pipelines.round import client_work, distributor, finalizer

        config, shape, classes = self.config, self.dataset.input_shape, self.dataset.num_classes
        return build_prism_process(  # each part and option from the config by the mapping the API's defaults use
            model_builder(config, shape, classes, self.model_width, self.vocabulary_size),
            client_work.client_optimizer_of(config), finalizer.server_optimizer_of(config),
            method=self._method, model_distributor=distributor.named(config.distribution),
            client_weighting=client_work.client_weighting_of(config),
            client_training=client_work.ClientTraining.of(config), lr_schedule=client_work.lr_schedule_of(config),
            batch_size=config.batch_size, refactorize_every=config.refactorize_every, seed=config.seed,
            min_clients=config.min_clients, factorize_options=config.factorize_options())

    def preprocess(self, x: np.ndarray) -> np.ndarray:
        """Raw test/training pixels -> model inputs, as the clients see them (sequences: as stored, token ids
        int32, features float32)."""
        if self.sequences:
            return np.asarray(x)
        return recipe.preprocess(x, self.input_mean, self.input_std)

    def input_stats(self) -> dict | None:
        """The per-channel input normalization clients and evaluation use (``input_stats.json``; ``None``: pixels /
        255 only)."""
        if self.input_mean is None:
            return None
        return dict(mean=self.input_mean.tolist(), std=self.input_std.tolist(), scale="pixels / 255")

    def calibration(self) -> list[np.ndarray] | None:
        """Training batches for ``--eval-norm recalibrate`` (a fixed seeded subset, drawn once)."""
        if self.config.eval_norm != "recalibrate":
            return None
        if self._calibration is None:
            self._calibration = calibration_batches(self.config, self.dataset.x_train, self.preprocess)
        return self._calibration

    def deployed_models(self, state) -> dict[str, tf.keras.Model]:
        """The models a user of this method would deploy (`prism_tf.federated.methods.deployed_models`)."""
        return methods_lib.deployed_models(self.process.method, self.process.assign_to(state))

    def client_cost(self) -> dict:
        """`prism_tf.cost` of a client's (default-size) sub-model."""
        return self.process._submodel_cost(self.process.layout.sizes_key)

    def final_model(self, state) -> tf.keras.Model:
        """The deployed model as plain Keras layers, with the BatchNorm statistics its evaluation used."""
        plain = prism_tf.unfactorize(self.deployed_models(state)["deployed"])
        if self.config.eval_norm == "recalibrate":
            evaluation.recalibrate_batchnorm(plain, self.calibration())
        return plain

    def evaluate(self, state) -> dict[str, float]:
        """``eval_loss``/``eval_accuracy`` of the deployed model (and ``*_server`` where that differs)."""
        out = {}
        for label, model in self.deployed_models(state).items():
            model = self._evaluation_model(label, model)
            loss, accuracy = evaluation.evaluate(
                model, self.x_test, self.y_test, norm=self.config.eval_norm, preprocess=self.preprocess,
                calibration=self.calibration(), seed=self.config.seed)
            suffix = "" if label == "deployed" else f"_{label}"
            out[f"eval_loss{suffix}"], out[f"eval_accuracy{suffix}"] = loss, accuracy
        return out

    def _evaluation_model(self, label: str, model: tf.keras.Model) -> tf.keras.Model:
        """One model per label for the whole run, ``model``'s weights copied in: HeteroFL's and FjORD's deployed
        sub-model is a new Keras model each round, and evaluating a new model traces its evaluation again."""
        kept = self._eval_models.setdefault(label, model)
        if kept is not model:
            if [w.shape for w in kept.weights] != [w.shape for w in model.weights]:
                self._eval_models[label] = kept = model
            else:
                kept.set_weights(model.get_weights())
        return kept

    def round_clients(self, round_index: int) -> list[int]:
        """The clients of the round of index ``round_index`` (0-based), a seeded draw without replacement
        (`round_clients`)."""
        return round_clients(self.config, round_index)

    def client_datasets(self, round_index: int, clients: Sequence[int] | None = None) -> list[tf.data.Dataset]:
        """The batched training datasets of ``clients`` (default: the round's) in the round of index
        ``round_index`` (0-based): shuffled, augmented and normalized as the run's recipe says
        (docs/algorithm.md §7)."""
        cfg = self.config
        clients = self.round_clients(round_index) if clients is None else clients
        out = []
        for client in clients:
            ds = self.client_data.create_tf_dataset_for_client(str(client))
            n = int(ds.cardinality())
            # A client's order depends on (seed, round, client) only, not on who else is in the round: a round whose
            # other clients trained on phones feeds it the same batches.
            order = prism_tf.streams.rng((cfg.seed, round_index, int(client)), "shuffle")
            ds = ds.shuffle(max(n, 1), seed=int(order.integers(2**31))).repeat(cfg.local_epochs)
            if self.image_options["augment"] == "crop_flip":  # before normalizing: the crop pads with black pixels
                ds = recipe.augment_dataset(ds, recipe.client_seed(cfg.seed, round_index, int(client)))
            if self.input_mean is not None:
                ds = ds.map(lambda e, m=self.input_mean, s=self.input_std: collections.OrderedDict(
                    x=recipe.normalize(e["x"], m, s), y=e["y"]))
            # Fixed batch shapes: TF 2.14's oneDNN kernels corrupt memory with a varying batch size
            # (docs/pitfalls.md, "oneDNN and batch shapes").
            out.append(ds.batch(cfg.batch_size, drop_remainder=True))
        return out

    def device_updates(self, round_num: int) -> tuple[prism_tf.server.Accumulator | None, list[int]]:
        """The updates devices uploaded for round ``round_num`` (1-based; `python -m export ingest`), accumulated,
        and their clients; ``(None, [])`` when there are none. Those clients are not simulated in that round."""
        stored = self.run.read_device_updates(round_num)
        if not stored:
            return None, []
        accumulator = prism_tf.server.Accumulator(self.process.plan)
        for client, values, selection, weight in stored:
            accumulator.add(values, prism_tf.Selection.from_dict(selection), weight, name=f"device client {client}")
        self.log(f"round {round_num}: {len(stored)} device update(s) (clients {', '.join(str(c) for c, *_ in stored)})"
                 " join the simulated clients")
        return accumulator, [c for c, *_ in stored]

    def train(self, *, resume: bool = False, until_round: int | None = None) -> dict[str, Any]:
        """Run the rounds (after the latest checkpoint with ``resume``; from the seeded initial model when the run
        has none), checkpointing and writing each round's metrics row as it ends, then the deployed model, summary
        and plot; returns the summary.

        ``until_round``: stop after that round (default: the run's last). Nothing else changes: each round is the
        one a run to the end would train (the learning-rate schedule still spans ``config.rounds``).
        """
        from tqdm.auto import tqdm

        cfg, run, process = self.config, self.run, self.process
        state = process.initialize()
        start = 0
        last = cfg.rounds if until_round is None else min(int(until_round), cfg.rounds)
        if resume:
            if run.has_checkpoints():
                state, start = run.load_state(state)
            rows = run.truncate_metrics(start)
            self.log(f"resuming {run.path} after round {start} of {cfg.rounds}"
                     + (f", until round {last}" if last < cfg.rounds else ""))
        else:
            rows = []
        b = self.budget
        self.log(f"client budget ({b['metric']}): this method's client model {b['flops_ratio']:.3f}x flops, "
                 f"{b['activation_bytes_ratio']:.3f}x activations of the full model; PriSM at keep "
                 f"{b['keep_ratio']}: {b['prism_flops_ratio']:.3f}x flops"
                 + (f"; channel fraction {b['width_fraction']:.3f}" if b.get("width_fraction") else "")
                 + (f"; small model width {b['small_width']}" if b.get("small_width") else ""))
        self._print_header()
        bar = tqdm(range(start + 1, last + 1), desc="rounds", unit="round", initial=start, total=cfg.rounds,
                   disable=None, file=sys.stderr)
        for round_num in bar:  # 1-based, as the table, metrics and checkpoints number rounds
            round_index = round_num - 1  # what seeds the round's clients and data (docs/algorithm.md §2)
            began = time.perf_counter()
            clients = self.round_clients(round_index)
            uploaded, devices = self.device_updates(round_num)
            simulated = [c for c in clients if c not in devices]
            state, metrics = process.next(state, self.client_datasets(round_index, simulated),
                                          client_ids=simulated, uploaded=uploaded, uploaded_ids=devices)
            row = self._row(round_num, metrics, time.perf_counter() - began)
            if devices:  # which of the round's clients trained on devices and which were simulated
                row.update(device_clients=sorted(devices), simulated_clients=sorted(simulated))
            self._report_faults(row, bar)
            if round_num % cfg.eval_every == 0 or round_num == cfg.rounds:
                row.update(self.evaluate(state))
            run.append_metrics(row)
            run.save_state(state, round_num)
            rows.append(row)
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", acc=_fmt(row.get("eval_accuracy")),
                            dropped=row["clients_dropped"])
            self._print_row(row, bar)
        bar.close()
        if rows:
            run.save_model(self.final_model(state))
        summary = self._summary(rows)
        run.write_summary(summary)
        if rows:
            run.plot(rows, f"{cfg.method} · {cfg.model} w{self.model_width} · keep {cfg.keep_ratio}")
        return summary

    def _row(self, round_num: int, m: dict[str, Any], seconds: float) -> dict[str, Any]:
        ref = self.reference_cost
        return dict(
            round=round_num, train_loss=m["loss"], train_accuracy=m["accuracy"], num_examples=m["num_examples"],
            kernel_coverage=m["kernel_coverage"], bytes_down_per_client=m["bytes_down_per_client"],
            bytes_up_per_client=m["bytes_up_per_client"], full_model_bytes=ref["bytes"],
            client_flops_per_example=m["client_flops_per_example"], full_flops_per_example=ref["flops"],
            client_activation_bytes_per_example=m["client_activation_bytes_per_example"],
            full_activation_bytes_per_example=ref["activation_bytes"], clients=m["clients"],
            clients_dropped=m["clients_dropped"], failed_clients=m["failed_clients"], failure=m["failure"],
            skipped=m["skipped"], skip_reason=m["skip_reason"], round_seconds=seconds)

    def _report_faults(self, row: dict[str, Any], bar) -> None:
        """Say on the console which clients a round dropped and whether it was skipped (docs/design.md)."""
        failed, dropped = row["failed_clients"], row["clients_dropped"]
        notes = []
        if failed:
            notes.append(f"client(s) {', '.join(str(c) for c in failed)} failed in training and were dropped "
                         f"(first error: {row['failure']})")
        if dropped > len(failed):
            notes.append(f"{dropped - len(failed)} client(s) sent a non-finite (NaN/Inf) update and were dropped")
        if row["skipped"]:
            notes.append(f"round skipped: {row['skip_reason']}")
        for note in notes:
            line = f"round {row['round']}: {note}"
            bar.write(line, file=sys.stdout) if self.log is print else self.log(line)

    def _print_header(self) -> None:
        self.log(f"{'round':>5} {'loss':>7} {'train acc':>9} {'test acc':>8} {'coverage':>8} "
                 f"{'down/full':>9} {'flops/full':>10} {'dropped':>7} {'sec':>6}")

    def _print_row(self, row: dict[str, Any], bar) -> None:
        line = (f"{row['round']:>5} {row['train_loss']:>7.3f} {row['train_accuracy']:>9.3f} "
                f"{_fmt(row.get('eval_accuracy')):>8} {row['kernel_coverage']:>8.3f} "
                f"{row['bytes_down_per_client'] / row['full_model_bytes']:>9.3f} "
                f"{row['client_flops_per_example'] / row['full_flops_per_example']:>10.3f} "
                f"{row['clients_dropped']:>7d} {row['round_seconds']:>6.1f}")
        bar.write(line, file=sys.stdout) if self.log is print else self.log(line)

    def _summary(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        evaluated = [r for r in rows if r.get("eval_accuracy") is not None]
        best = max(evaluated, key=lambda r: r["eval_accuracy"]) if evaluated else None
        last = rows[-1] if rows else {}
        return dict(
            method=self.config.method, rounds=len(rows), model_width=self.model_width,
            final_accuracy=evaluated[-1]["eval_accuracy"] if evaluated else None,
            best_accuracy=best["eval_accuracy"] if best else None, best_round=best["round"] if best else None,
            bytes_down_ratio=last.get("bytes_down_per_client", math.nan) / self.reference_cost["bytes"],
            bytes_up_ratio=last.get("bytes_up_per_client", math.nan) / self.reference_cost["bytes"],
            flops_ratio=last.get("client_flops_per_example", math.nan) / self.reference_cost["flops"],
            params_ratio=self.client_cost()["params"] / self.reference_cost["params"],
            activation_ratio=last.get("client_activation_bytes_per_example", math.nan)
            / self.reference_cost["activation_bytes"],
            eval_norm=self.config.eval_norm, budget=self.budget,
            clients_dropped=sum(r.get("clients_dropped", 0) for r in rows),
            rounds_skipped=sum(bool(r.get("skipped")) for r in rows),
            mean_round_seconds=float(np.mean(timed)) if (timed := [r["round_seconds"] for r in rows
                                                                  if r.get("round_seconds") is not None]) else None,
            run_dir=str(self.run.path))


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def start(config: TrainConfig, out: str, *, overwrite: bool = False) -> dict[str, Any]:
    """Start a new run in ``out``; nothing is written there until the data and the process are ready."""
    config.validate()
    # The config records the precision the run trains at (auto: what this CPU chose), so a resume elsewhere continues
    # as it began.
    config.precision = prism_tf.precision.resolve(config.precision)
    run = RunDir(out)
    run.check_writable(overwrite=overwrite)
    simulation = Simulation(config, out)  # loads and partitions the data: may fail
    _ = simulation.process  # built before anything is written: a failure leaves the directory as it was
    run.write_config(dataclasses.asdict(config), overwrite=overwrite)
    run.clear_results()
    run.write_input_stats(simulation.input_stats())
    run.write_budget(simulation.budget)
    run.write_data_spec(simulation.dataset.input_shape, simulation.dataset.num_classes, simulation.vocabulary_size)
    return simulation.train()


def load_run(out: str, **overrides: Any) -> tuple[Simulation, Any, int]:
    """The run in ``out`` rebuilt (data, process) with its latest checkpoint: ``(simulation, state, round)``."""
    run = RunDir(out)
    simulation = Simulation(stored_config(run, **overrides), out, log=lambda _: None)
    state, round_num = run.load_state(simulation.process.initialize())
    return simulation, state, round_num


def resume(out: str, rounds: int | None = None, until_round: int | None = None) -> dict[str, Any]:
    """Continue the run in ``out`` from its latest checkpoint (from round 1 when it has none: a run whose first
    round was never finished), optionally to a new total of ``rounds``.

    The open round's clients with a device update stored (`python -m export ingest`, `export serve`) take it; the
    others are simulated. ``until_round``: stop after finishing that round, leaving ``config.json`` (and so the
    learning-rate schedule of the rounds after it) as it is; what ``python -m export serve --fill simulated`` runs
    to finish one round. Each round it trains equals that round of a resume to the end.
    """
    run = RunDir(out)
    config = stored_config(run)
    config.validate()  # a stored value this version no longer accepts: named before anything is loaded
    run.check_can_write()  # a read-only or full disk: refused before data and tracing
    # None readable: refused here; `train` names the unreadable ones. No checkpoint at all: round 1 is open.
    finished = run.latest_checkpoint(warn=None) if run.has_checkpoints() else 0
    if rounds is not None:
        config.rounds = rounds
        config.validate()
        if rounds < finished:
            raise ValueError(f"--rounds {rounds} is below the {finished} rounds {out} has finished")
    if until_round is not None:
        if until_round < 1:
            raise ValueError(f"--until-round must be at least 1 (rounds are numbered from 1), got {until_round}")
        if until_round <= finished:
            raise ValueError(f"--until-round {until_round}: {out} has finished {finished} round(s), so round "
                             f"{until_round} is finished already (its open round is {finished + 1})")
        if until_round > config.rounds:
            raise ValueError(f"--until-round {until_round} is past the run's last round, {config.rounds} (give "
                             "--rounds N to train more rounds)")
    if run.read_data_spec() is not None:
        # Without TFF, before data and tracing: config.json still describes the model the checkpoint holds.
        RoundReplay(out, finished + 1)
    simulation = Simulation(config, out)
    if rounds is not None:
        run.write_config(dataclasses.asdict(config), overwrite=True)
    if run.read_data_spec() is None:  # a run from before data_spec.json existed
        run.write_data_spec(simulation.dataset.input_shape, simulation.dataset.num_classes,
                            simulation.vocabulary_size)
    return simulation.train(resume=True, until_round=until_round)
