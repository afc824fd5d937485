"""Command line: ``python -m tff_pipelines {train,resume} ...`` (argument parsing only; see `driver`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import prism_tf
from prism_tf.federated.methods import METHODS

# What each `TrainConfig` option means. Its default is not written here: `--help` states the field's default
# (`_help`), so the two cannot disagree; an option whose default is ``None`` says what ``None`` means instead.
_FIELD_HELP = {
    "method": f"federated method: {', '.join(METHODS)}",
    "model": "model from prism_tf.models: resnet18, vgg11, small_cnn, vit (images); lstm (token classification, "
             "e.g. imdb), charlstm (next character: python_source, shakespeare, a .txt folder), kws (Conv1D over "
             "[frames, features] from a .npz)",
    "width": "base width: channels of the first stage (64 is the paper's ResNet-18), vit's embedding dimension, "
             "the LSTMs' hidden size (256 in the papers)",
    "norm": "normalization: batch, group or none (CNNs, kws); layer or none (vit); none (LSTMs)",
    "dataset": "images: 'cifar10' (local copy if found, else Keras download) or a class-folder directory/.tar.gz; "
               "sequences: imdb (Keras download), python_source (offline: the Python standard library's modules, "
               "one client each), shakespeare (TFF download, one client per role), a folder of .txt files (one "
               "client each) or a .npz (x_train, y_train, x_test, y_test[, clients_train])",
    "data": "where the local CIFAR-10 copy is",
    "sequence_length": "sequence datasets: IMDB's review length, the next-character window of text",
    "clients": "number of clients the training set is split over",
    "clients_per_round": "clients sampled per round",
    "min_clients": "fewest good clients (finite update, training did not fail) a round needs; with fewer the server "
                   "state is kept and the round is marked skipped",
    "examples_per_client": "cap on each client's examples",
    "rounds": "total federated rounds",
    "local_epochs": "local epochs per round; the authors use 2",
    "batch_size": "client batch size; partial batches are dropped (fixed shapes)",
    "keep_ratio": "share of each layer's kernels (or channels) a client trains, in (0, 1]",
    "strategy": "kernel sampling: prism, top, uniform, unbiased, collective",
    "gamma": "PriSM's exponent p ~ s^gamma",
    "output_keep": "memory-efficient variant: share of owned output channels each client keeps",
    "keep_mix": "heterogeneous clients, e.g. 0.2:0.6,0.4:0.4 (keep ratio:share of clients)",
    "partition": "iid, dirichlet:ALPHA (label skew), shards:K, or natural (a sequence dataset's own clients: "
                 "modules, files, roles, clients_train; the first --clients of them)",
    "eval_every": "evaluate the server model on the test set every T rounds",
    "eval_examples": "evaluate on a fixed random subset of N test examples",
    "seed": "run seed: data split, model init, client sampling, kernel sampling",
    "distribution": "select (tff.federated_select per client) or broadcast (faster simulation)",
    "client_lr": "client SGD learning rate; the authors use 0.1",
    "lr_schedule": "client learning rate over rounds: cosine (to --final-lr, the authors') or constant",
    "final_lr": "learning rate of the last round with --lr-schedule cosine",
    "frobenius_decay": "decay of each factorized product A·B (gradient λ·A(BBᵀ), λ·(AᵀA)B)",
    "weight_decay": "weight decay of the other conv/dense kernels",
    "augment": "client data augmentation of images: crop_flip (pad 4, random crop, horizontal flip) or none",
    "normalize": "input normalization of images: channel (per-channel mean/std of the training set) or none",
    "client_momentum": "client SGD momentum",
    "clip_norm": "client gradient-norm clip, 0 disables",
    "server_lr": "server SGD learning rate on the rebuilt kernels",
    "server_momentum": "server momentum with --server-lr",
    "eval_norm": "BatchNorm at evaluation: batch (per-batch statistics over shuffled test batches, as the PriSM "
                 "authors), recalibrate (the full model's statistics re-estimated on training batches, HeteroFL's "
                 "static BN) or moving (the clients' averaged moving statistics)",
    "match": "client budget of width methods and small: flops (channel fraction whose client flops match PriSM's "
             "at --keep-ratio), activations (match activation memory) or nominal (--keep-ratio as channel fraction)",
    "calibration_examples": "training examples used by --eval-norm recalibrate",
    "refactorize_every": "re-run the SVD every N rounds, 0 never",
    "weighting": "examples (weight clients by examples) or uniform",
    "precision": "client training precision: float32, mixed_bfloat16 (bfloat16 compute, float32 master weights, "
                 "aggregation and SVD) or auto (mixed_bfloat16 where the CPU has AMX/AVX512-BF16); the run's config "
                 "records what auto chose",
    "warmup_rounds": "spectral methods: the first N rounds every client trains the top-k kernels (no sampling)",
    "rank_allocation": "spectral methods: uniform (ceil(keep*r) kernels per layer) or flops[:ALPHA] (the same "
                       "client flops, more kernels where a kernel costs fewer multiply-adds; flops alone is ALPHA 1)",
    "kernel_lr_balance": "spectral methods: balanced kernel learning rates, each principal kernel's factors learn at "
                         "clip(mean(s)/s_i, 1/CAP, CAP) of the rate (s_i = |a_i||b_i|), so small-s kernels move as "
                         "fast as large ones",
    "server_optimizer": "server optimizer with --server-lr: sgd (with --server-momentum: FedAvgM) or adam (FedAdam)",
    "attention": "MultiHeadAttention projections: whole (the authors' DeiT runs: only the MLPs are factorized) or "
                 "factorized (query, key, value and output as principal kernels)",
}
# What a ``None`` default means, for the options that have one.
_NONE_MEANS = {
    "norm": "the model's: batch, vit layer, LSTMs none",
    "data": "$PRISM_DATA or ../shared/data/cifar10-jpg.tar.gz",
    "sequence_length": "200 for imdb, 80 for text; a .npz keeps its own",
    "augment": "crop_flip for images, none for sequences",
    "normalize": "channel for images, none for sequences",
    "examples_per_client": "all of its partition",
    "gamma": "4 at keep <= 0.2, else 2.5",
    "output_keep": "all",
    "keep_mix": "every client at --keep-ratio",
    "eval_examples": "all",
    "server_lr": "plain per-kernel averaging",
    "kernel_lr_balance": "off: kernel i's product moves at about s_i times a plain kernel's rate",
}


def _help(field: dataclasses.Field) -> str:
    """``field``'s description and its default, read from the `TrainConfig` field (docs/algorithm.md §7)."""
    if field.default is None:
        return f"{_FIELD_HELP[field.name]} (default: {_NONE_MEANS[field.name]})"
    shown = f"{field.default:g}" if isinstance(field.default, float) else str(field.default)
    return f"{_FIELD_HELP[field.name]} (default {shown})"


def build_parser() -> argparse.ArgumentParser:
    """The ``train``/``resume``/``worker`` parser: one ``train`` flag per `TrainConfig` field, its default the
    field's."""
    from prism_tf.evaluation import EVAL_NORMS
    from prism_tf.federated import recipe
    from tff_pipelines.program.driver import AUGMENTS, MATCHES, NORMALIZE, SERVER_OPTIMIZERS, TrainConfig
    from tff_pipelines.round.distributor import DISTRIBUTIONS

    choices_of = {
        "method": METHODS, "model": tuple(prism_tf.models.MODELS),
        "norm": tuple(sorted({n for spec in prism_tf.models.MODEL_SPECS.values() for n in spec.norms})),
        "strategy": prism_tf.STRATEGIES, "distribution": DISTRIBUTIONS, "weighting": ("examples", "uniform"),
        "eval_norm": EVAL_NORMS, "lr_schedule": recipe.SCHEDULES, "augment": AUGMENTS, "normalize": NORMALIZE,
        "match": MATCHES, "attention": ("whole", "factorized"), "precision": prism_tf.precision.PRECISIONS,
        "server_optimizer": SERVER_OPTIMIZERS,
    }

    parser = argparse.ArgumentParser(
        prog="python -m tff_pipelines",
        description="PriSM federated learning simulations on TensorFlow Federated.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="start a run", description="Start a federated training run.")
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = {"int": int, "float": float, "str": str}.get(str(field.type).split(" |")[0], str)
        if field.name == "clip_norm":
            kind = float
        choices = choices_of.get(field.name)
        train.add_argument(flag, type=kind, default=field.default, help=_help(field),
                           metavar="{" + ",".join(choices) + "}" if choices else field.name.upper(), choices=choices)
    train.add_argument("--out", required=True, help="run directory (config, metrics.jsonl, checkpoints, plot)")
    train.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    again = commands.add_parser("resume", help="continue a stopped run from its last checkpoint",
                                description="Continue a run from its latest checkpoint.")
    again.add_argument("--out", required=True, help="run directory of the run to continue")
    again.add_argument("--rounds", type=int, default=None, help="new total number of rounds (default: as before)")
    again.add_argument("--until-round", type=int, default=None, metavar="K",
                       help="stop after finishing round K (default: the run's last round); config.json, and so the "
                            "learning-rate schedule, stays as it is: round K equals round K of a resume to the end. "
                            "The open round's clients with a stored device update take it, the others are "
                            "simulated (what `python -m export serve --fill simulated` runs at each close)")
    for command in (train, again):
        command.add_argument("--workers", default=None, metavar="HOST:PORT,...",
                             help="run each round's clients spread over these TFF workers (started with the "
                                  "`worker` command; docs/deploy.md) instead of one local worker")
    from tff_pipelines.workers import worker_process

    worker_process.add_arguments(commands.add_parser(
        "worker", help="serve one TFF worker for `train --workers` (loopback unless --bind)",
        description=worker_process.DESCRIPTION))
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m tff_pipelines``: parse ``argv``, run the command; the exit code (2: a bad input, named in one
    ``error:`` line)."""
    from prism_tf.quiet import import_tensorflow

    import_tensorflow()  # an entry point quiets TensorFlow's CPU-only start-up lines itself
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "worker":  # normally dispatched by __main__ before TensorFlow is imported
        from tff_pipelines.workers import worker_process

        return worker_process.run(args)
    from prism_tf.federated.data import DataError
    from prism_tf.federated.rundir import RunError
    from tff_pipelines.program import driver
    from tff_pipelines.workers.remote import WorkerUnavailableError

    try:
        if args.workers is not None:
            from tff_pipelines.workers import remote as workers

            workers.install_worker_context(workers.parse_workers(args.workers))
        if args.command == "train":
            options = {k: v for k, v in vars(args).items() if k not in ("command", "out", "overwrite", "workers")}
            if options.get("clip_norm") == 0:
                options["clip_norm"] = None
            config = driver.TrainConfig(**options)
            summary = driver.start(config, args.out, overwrite=args.overwrite)
        else:
            summary = driver.resume(args.out, args.rounds, args.until_round)
    except (ValueError, DataError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except WorkerUnavailableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full or read-only disk mid-run: the rounds finished before it stay checkpointed
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: the last finished round is checkpointed; continue with "
              f"`python -m tff_pipelines resume --out {args.out}`", file=sys.stderr)
        return 130
    print(json.dumps(summary, indent=2))
    print(f"results: {args.out}/metrics.jsonl, {args.out}/summary.json, {args.out}/accuracy.png, "
          f"checkpoints in {args.out}/checkpoints/")
    return 0
