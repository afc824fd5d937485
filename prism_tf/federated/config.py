"""What a run is, without TFF: its options (`TrainConfig`), its server model and its client budget.

Everything here is plain Python, numpy and Keras, so the exporter, device ingest and round replay
(`prism_tf.federated.replay`) can rebuild a run's model and its clients' sub-models without starting a TFF worker.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

import prism_tf
from prism_tf.evaluation import EVAL_NORMS
from prism_tf.federated import recipe
from prism_tf.federated.methods import METHODS, REGISTRY, Method, PriSM, equal_cost_method
from prism_tf.federated.rundir import RunDir, RunError


@dataclasses.dataclass
class TrainConfig:
    """Every option of a simulated run (the CLI's flags; stored as ``config.json``).

    The one definition of the options' defaults: the CLI's ``--help`` states them from these fields
    (`tff_pipelines.program.cli`), and runs written before an option existed get `LEGACY_DEFAULTS` instead.
    """

    method: str = "prism"
    model: str = "resnet18"
    width: int = 16
    norm: str | None = None
    dataset: str = "cifar10"
    data: str | None = None
    sequence_length: int | None = None
    clients: int = 20
    clients_per_round: int = 5
    min_clients: int = 1
    examples_per_client: int | None = None
    rounds: int = 10
    local_epochs: int = 2
    batch_size: int = 32
    keep_ratio: float = 0.2
    strategy: str = "prism"
    gamma: float | None = None
    output_keep: float | None = None
    keep_mix: str | None = None
    partition: str = "iid"
    eval_every: int = 1
    eval_examples: int | None = None
    seed: int = 0
    distribution: str = "select"
    client_lr: float = 0.1
    client_momentum: float = 0.9
    clip_norm: float | None = 5.0
    lr_schedule: str = "cosine"
    final_lr: float = 1e-4
    frobenius_decay: float = 2e-4
    weight_decay: float = 5e-4
    augment: str | None = None
    normalize: str | None = None
    server_lr: float | None = None
    server_momentum: float = 0.0
    refactorize_every: int = 1
    weighting: str = "examples"
    eval_norm: str = "recalibrate"
    match: str = "flops"
    calibration_examples: int = 1000
    attention: str = "whole"
    precision: str = "float32"
    warmup_rounds: int = 0
    rank_allocation: str = "uniform"
    server_optimizer: str = "sgd"
    kernel_lr_balance: float | None = None

    def factorize_options(self) -> dict[str, Any]:
        """The keyword arguments of `prism_tf.factorize` this run's server model is factorized with."""
        return {"attention": self.attention == "factorized"}

    def validate(self) -> None:
        """Raise `ValueError` naming the first option (as its CLI flag) whose value a run cannot use."""
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.model not in prism_tf.models.MODELS:
            raise ValueError(f"--model must be one of {', '.join(prism_tf.models.MODELS)}, got {self.model!r}")
        norms = prism_tf.models.model_spec(self.model).norms
        if self.norm is not None and self.norm not in norms:
            raise ValueError(f"--norm {self.norm} does not apply to --model {self.model}: it takes "
                             f"{' or '.join(norms)} (default {norms[0]})")
        if self.sequence_length is not None and self.sequence_length < 1:
            raise ValueError(f"--sequence-length must be >= 1, got {self.sequence_length}")
        positive = dict(width=self.width, clients=self.clients, clients_per_round=self.clients_per_round,
                        rounds=self.rounds, local_epochs=self.local_epochs, batch_size=self.batch_size,
                        eval_every=self.eval_every, min_clients=self.min_clients)
        for name, value in positive.items():
            if int(value) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.clients_per_round > self.clients:
            raise ValueError(f"--clients-per-round ({self.clients_per_round}) exceeds --clients ({self.clients})")
        if self.min_clients > self.clients_per_round:
            raise ValueError(f"--min-clients ({self.min_clients}) exceeds --clients-per-round "
                             f"({self.clients_per_round}): every round would be skipped")
        if self.examples_per_client is not None and self.examples_per_client < self.batch_size:
            raise ValueError(f"--examples-per-client ({self.examples_per_client}) is below --batch-size "
                             f"({self.batch_size}): clients would train on nothing")
        if self.eval_norm not in EVAL_NORMS:
            raise ValueError(f"--eval-norm must be one of {', '.join(EVAL_NORMS)}, got {self.eval_norm!r}")
        for name, value, allowed in (("lr_schedule", self.lr_schedule, recipe.SCHEDULES),
                                     ("augment", self.augment, AUGMENTS), ("normalize", self.normalize, NORMALIZE)):
            if value is not None and value not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {value!r}")
        for name in ("client_lr", "final_lr", "frobenius_decay", "weight_decay"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value!r}")
        if self.attention not in ("whole", "factorized"):
            raise ValueError(f"--attention must be whole or factorized, got {self.attention!r}")
        prism_tf.precision.check_precision(self.precision)
        spectral = self.method in REGISTRY and REGISTRY[self.method].spectral
        if self.warmup_rounds and not spectral:
            raise ValueError(f"--warmup-rounds applies to spectral methods (prism, fedhm), not --method {self.method}")
        if prism_tf.budget.parse_rank_allocation(self.rank_allocation) is not None:
            if not spectral:
                raise ValueError(f"--rank-allocation {self.rank_allocation} applies to spectral methods (prism, "
                                 f"fedhm), not --method {self.method}")
            if self.match != "flops":
                raise ValueError(f"--rank-allocation {self.rank_allocation} spends PriSM's client flops: it needs "
                                 f"--match flops, got --match {self.match}")
        if self.server_optimizer not in SERVER_OPTIMIZERS:
            raise ValueError(f"--server-optimizer must be one of {', '.join(SERVER_OPTIMIZERS)}, got "
                             f"{self.server_optimizer!r}")
        if self.server_optimizer != "sgd" and self.server_lr is None:
            raise ValueError(f"--server-optimizer {self.server_optimizer} needs --server-lr (FedAdam: e.g. 0.01)")
        if self.kernel_lr_balance is not None:
            if not spectral:
                raise ValueError(f"--kernel-lr-balance applies to spectral methods (prism, fedhm), not --method "
                                 f"{self.method}")
            if not (math.isfinite(self.kernel_lr_balance) and self.kernel_lr_balance >= 1):
                raise ValueError(f"--kernel-lr-balance must be a cap >= 1, got {self.kernel_lr_balance}")
        if self.match not in MATCHES:
            raise ValueError(f"--match must be one of {', '.join(MATCHES)}, got {self.match!r}")
        if self.calibration_examples < 2:
            raise ValueError(f"--calibration-examples must be >= 2, got {self.calibration_examples}")
        if self.eval_examples is not None and self.eval_examples < 1:
            raise ValueError(f"--eval-examples must be >= 1, got {self.eval_examples}")
        prism_tf.sampling.check_keep_ratio(self.keep_ratio, "--keep-ratio")
        if self.output_keep is not None:
            prism_tf.sampling.check_keep_ratio(self.output_keep, "--output-keep")
        check_batch_size(self.batch_size)
        self.method_spec()  # the method's own checks (keep mix, warm-up rounds, rank allocation)

    def step_options(self) -> prism_tf.local_step.StepOptions:
        """The gradient transformations of this run's local step (`prism_tf.local_step`): what a simulated client
        and an exported device model both apply (ClipLR at its default τ)."""
        return prism_tf.local_step.StepOptions(clip_norm=self.clip_norm, frobenius_decay=self.frobenius_decay,
                                               weight_decay=self.weight_decay, kernel_lr_cap=self.kernel_lr_balance)

    def method_spec(self) -> Method:
        """The run's `Method` at its nominal keep ratio (before `client_budget` matches it to PriSM's cost)."""
        return Method.create(self.method, keep_ratio=self.keep_ratio, strategy=self.strategy, gamma=self.gamma,
                             output_keep=self.output_keep, keep_mix=parse_keep_mix(self.keep_mix),
                             warmup_rounds=self.warmup_rounds, rank_allocation=self.rank_allocation)


SERVER_OPTIMIZERS = ("sgd", "adam")
"""``--server-optimizer`` with ``--server-lr``: SGD (with ``--server-momentum``: FedAvgM) or Adam (FedAdam, Reddi et
al. 2021), both on the rebuilt kernels."""

AUGMENTS = ("none", "crop_flip")
NORMALIZE = ("none", "channel")
IMAGE_RECIPE = {"augment": "crop_flip", "normalize": "channel"}
"""The image-only options and their defaults for image datasets (``None`` in `TrainConfig`: the dataset's)."""


def input_recipe(config: TrainConfig, dataset: Any) -> dict[str, str]:
    """``augment`` and ``normalize`` of a run on ``dataset``: the config's, or the dataset's default where unset
    (`IMAGE_RECIPE` for an image dataset, ``none`` for a sequence dataset, which has no pixels to crop or
    normalize per channel).

    Raises:
      ValueError: an image option asked for on a sequence dataset, named as its flag.
    """
    images = not is_sequence_data(dataset)
    out = {}
    for name, default in IMAGE_RECIPE.items():
        value = getattr(config, name)
        if not images and value not in (None, "none"):
            raise ValueError(f"--{name} {value} is for image datasets; --dataset {config.dataset} holds sequences "
                             f"(leave --{name} unset or give none)")
        out[name] = value if value is not None else (default if images else "none")
    return out


def is_sequence_data(dataset: Any) -> bool:
    """Whether ``dataset`` is a `prism_tf.federated.sequences.SequenceDataset` (else an image dataset)."""
    return hasattr(dataset, "vocabulary_size")


def data_inputs(dataset: Any) -> tuple[str, str]:
    """What ``dataset`` feeds a model: (`prism_tf.models.ModelSpec.inputs`, task): ``("image", "classification")``,
    ``("tokens", task)`` or ``("features", task)``."""
    if not is_sequence_data(dataset):
        return "image", "classification"
    return ("tokens" if dataset.x_train.ndim == 2 else "features"), dataset.task


def check_model_fits(config: TrainConfig, dataset: Any) -> None:
    """Raise one `ValueError` naming ``--model`` and ``--dataset`` when the model cannot take the dataset's inputs
    or labels (an image model on token ids, a classifier on next-token labels, ...)."""
    spec = prism_tf.models.model_spec(config.model)
    inputs, task = data_inputs(dataset)
    if (spec.inputs, spec.task) == (inputs, task):
        return
    takes = {"image": "images", "tokens": "token ids", "features": "feature frames"}
    labels = {"classification": "one label per example", "next_token": "a next token per step"}
    fitting = [name for name, s in prism_tf.models.MODEL_SPECS.items() if (s.inputs, s.task) == (inputs, task)]
    raise ValueError(
        f"--model {config.model} takes {takes[spec.inputs]} with {labels[spec.task]}, but --dataset {config.dataset} "
        f"holds {takes[inputs]} {list(dataset.input_shape)} with {labels[task]}"
        + (f"; models for it: {', '.join(fitting)}" if fitting else ""))


def parse_keep_mix(text: str | None) -> tuple[tuple[float, float], ...] | None:
    """``"0.2:0.6,0.4:0.4"`` -> ``((0.2, 0.6), (0.4, 0.4))`` (keep ratio : share of clients)."""
    if not text:
        return None
    try:
        mix = tuple((float(r), float(s)) for r, s in (part.split(":") for part in text.split(",")))
    except ValueError:
        raise ValueError(f"--keep-mix must look like 0.2:0.6,0.4:0.4 (ratio:share,...), got {text!r}") from None
    for ratio, share in mix:
        prism_tf.sampling.check_keep_ratio(ratio, "--keep-mix ratio")
        if share <= 0:
            raise ValueError(f"--keep-mix shares must be positive, got {share}")
    return mix


def model_builder(config: TrainConfig, input_shape, num_classes: int, width: int | None = None,
                  vocabulary_size: int | None = None) -> Callable:
    """A function building the run's model (at ``width``, default ``--width``), seeded by the run: every call,
    and every method of the same config, starts from the same initial weights.

    ``vocabulary_size``: the token models' embedding rows (a sequence dataset's ``vocabulary_size``; ignored by the
    other models). ``--norm`` unset is the model's default (`prism_tf.models.ModelSpec.default_norm`).
    """

    def build() -> tf.keras.Model:
        tf.keras.utils.set_random_seed(config.seed)  # the same initial server model for every method
        return prism_tf.models.build_model(config.model, width=width or config.width, num_classes=num_classes,
                                           input_shape=input_shape, norm=config.norm,
                                           vocabulary_size=vocabulary_size or None)

    return build


MATCHES = ("flops", "activations", "nominal")


def client_budget(config: TrainConfig, input_shape, num_classes: int,
                  vocabulary_size: int | None = None) -> tuple[Method, int, dict]:
    """The method at the run's client budget (docs/algorithm.md §5): its `Method`, model width and budget record.

    ``--match flops`` (default) / ``activations`` give every width method the channel fraction, and ``small`` the
    model width, whose client flops (activation bytes) are closest to PriSM's sub-model at ``--keep-ratio``
    (`Method.match_cost`); ``nominal`` uses ``--keep-ratio`` as the channel fraction and records PriSM's budget
    (a method that is `Method.always_matched`, ``small``, is still matched by flops). ``vocabulary_size``: as in
    `model_builder`.
    """
    method = config.method_spec()
    metric = "activation_bytes" if config.match == "activations" else "flops"
    full = model_builder(config, input_shape, num_classes, vocabulary_size=vocabulary_size)()
    if method.width and not prism_tf.SubmodelPlan.of(full).free_channel_groups():
        raise ValueError(f"--method {config.method} slices channels, but --model {config.model} has no channel group "
                         "it can slice (its layers without a layer kind, such as LSTMs, travel whole); use a method "
                         "that needs none: prism, fedhm, small or fedavg")
    if config.match == "nominal" and not method.always_matched:
        _, info = equal_cost_method(PriSM(keep_ratio=method.keep_ratio, output_keep=method.output_keep), full, metric,
                                    factorize_options=config.factorize_options())
        info.update(metric="nominal", width_fraction=None)
        return method, config.width, info
    build = lambda width: model_builder(config, input_shape, num_classes, width, vocabulary_size)()  # noqa: E731
    matched, info = equal_cost_method(method, full, metric, build_model=build, max_width=config.width,
                                      factorize_options=config.factorize_options())
    return matched, matched.model_width(info, config.width), info


def onednn_enabled() -> bool:
    """Whether TensorFlow uses its oneDNN kernels (the default on x86 Linux unless TF_ENABLE_ONEDNN_OPTS=0)."""
    return os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1").strip().lower() not in ("0", "false", "off")


def check_batch_size(batch_size: int) -> None:
    """Reject batch sizes that crash TF 2.14's oneDNN kernels on these CPUs.

    Measured here (ResNet-18, 32×32×3, FedAvg or PriSM alike): client training with batch sizes 15, 25, 27 and 33
    aborts the TFF worker with glibc heap corruption ("double free or corruption", SIGABRT/SIGSEGV) within the
    first round; 16, 20, 24, 32 and 40 run clean, and batch 25 runs clean with TF_ENABLE_ONEDNN_OPTS=0.
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if batch_size % 2 and onednn_enabled():
        raise ValueError(
            f"batch size {batch_size} is odd: TF 2.14's oneDNN kernels corrupt memory with odd batch sizes on this "
            "CPU (the TFF worker aborts). Use an even batch size, or set TF_ENABLE_ONEDNN_OPTS=0 before starting "
            "Python (about 2x slower training)."
        )


def round_clients(config: TrainConfig, round_index: int) -> list[int]:
    """The clients of the round of index ``round_index`` (0-based; round ``round_index + 1`` as users count):
    ``clients_per_round`` of ``clients`` drawn without replacement from the stream ``((seed, round_index),
    "participants")`` (`prism_tf.streams`), sorted."""
    rng = prism_tf.streams.rng((config.seed, round_index), "participants")
    return [int(c) for c in np.sort(rng.choice(config.clients, config.clients_per_round, replace=False))]


# Options added after runs were first written, with the behaviour those runs had: a run directory from before an
# option existed continues as it was trained, not with today's default.
LEGACY_DEFAULTS = dict(normalize="none", augment="none", lr_schedule="constant", frobenius_decay=0.0,
                       weight_decay=0.0, match="nominal")


def stored_config(run: RunDir, **overrides: Any) -> TrainConfig:
    """The `TrainConfig` of an existing run directory (older configs get `LEGACY_DEFAULTS`)."""
    stored = run.read_config()
    unknown = set(stored) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise RunError(f"{run.config_path} has unknown options {sorted(unknown)}")
    return TrainConfig(**{**LEGACY_DEFAULTS, **stored, **overrides})


def calibration_batches(config: TrainConfig, x_train: np.ndarray, preprocess: Callable) -> list[np.ndarray]:
    """The training batches a run recalibrates BatchNorm statistics on (``--eval-norm recalibrate``): a subset of
    ``calibration_examples`` seeded by the run, in batches of 100 (`prism_tf.evaluation.calibration_batches`)."""
    return prism_tf.evaluation.calibration_batches(x_train, 100, config.calibration_examples, config.seed,
                                                   preprocess)
