"""Command line: ``python -m tff_pipelines {train,resume} ...`` (argument parsing only; see `driver`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import prism_tf
from prism_tf.federated.methods import METHODS

_FIELD_HELP = {
    "method": f"federated method: {', '.join(METHODS)} (default prism)",
    "model": "model from prism_tf.models: resnet18, vgg11, small_cnn (default resnet18)",
    "width": "base width (channels of the first stage; 64 is the paper's ResNet-18) (default 16)",
    "norm": "normalization: batch, group or none (default batch)",
    "dataset": "'cifar10' (local copy if found, else Keras download) or a class-folder directory/.tar.gz",
    "data": "where the local CIFAR-10 copy is (default: $PRISM_DATA or ../shared/data/cifar10-jpg.tar.gz)",
    "clients": "number of clients the training set is split over (default 20)",
    "clients_per_round": "clients sampled per round (default 5)",
    "min_clients": "fewest good clients (finite update, training did not fail) a round needs; with fewer the server "
                   "state is kept and the round is marked skipped (default 1)",
    "examples_per_client": "cap on each client's examples (default: all of its partition)",
    "rounds": "total federated rounds (default 10)",
    "local_epochs": "local epochs per round (default 2, the authors')",
    "batch_size": "client batch size; partial batches are dropped (fixed shapes) (default 32)",
    "keep_ratio": "share of each layer's kernels (or channels) a client trains, in (0, 1] (default 0.2)",
    "strategy": "kernel sampling: prism, top, uniform, unbiased, collective (default prism)",
    "gamma": "PriSM's exponent p ~ s^gamma (default 4 at keep <= 0.2, else 2.5)",
    "output_keep": "memory-efficient variant: share of owned output channels each client keeps (default all)",
    "keep_mix": "heterogeneous clients, e.g. 0.2:0.6,0.4:0.4 (keep ratio:share of clients)",
    "partition": "iid, dirichlet:ALPHA (label skew) or shards:K (default iid)",
    "eval_every": "evaluate the server model on the test set every T rounds (default 1)",
    "eval_examples": "evaluate on a fixed random subset of N test examples (default: all)",
    "seed": "run seed: data split, model init, client sampling, kernel sampling (default 0)",
    "distribution": "select (tff.federated_select per client, default) or broadcast (faster simulation)",
    "client_lr": "client SGD learning rate (the authors': 0.1) (default 0.1)",
    "lr_schedule": "client learning rate over rounds: cosine (to --final-lr, the authors') or constant "
                   "(default cosine)",
    "final_lr": "learning rate of the last round with --lr-schedule cosine (default 1e-4)",
    "frobenius_decay": "decay of each factorized product A·B (gradient λ·A(BBᵀ), λ·(AᵀA)B) (default 2e-4)",
    "weight_decay": "weight decay of the other conv/dense kernels (default 5e-4)",
    "augment": "client data augmentation: crop_flip (pad 4, random crop, horizontal flip) or none (default crop_flip)",
    "normalize": "input normalization: channel (per-channel mean/std of the training set) or none (default channel)",
    "client_momentum": "client SGD momentum (default 0.9)",
    "clip_norm": "client gradient-norm clip, 0 disables (default 5)",
    "server_lr": "server SGD learning rate on the rebuilt kernels (default: plain per-kernel averaging)",
    "server_momentum": "server momentum with --server-lr (default 0)",
    "eval_norm": "BatchNorm at evaluation: batch (per-batch statistics over shuffled test batches, as the PriSM "
                 "authors), recalibrate (the full model's statistics re-estimated on training batches, HeteroFL's "
                 "static BN) or moving (the clients' averaged moving statistics) (default recalibrate)",
    "match": "client budget of width methods and small: flops (channel fraction whose client flops match PriSM's "
             "at --keep-ratio), activations (match activation memory) or nominal (--keep-ratio as channel fraction) "
             "(default flops)",
    "calibration_examples": "training examples used by --eval-norm recalibrate (default 1000)",
    "refactorize_every": "re-run the SVD every N rounds, 0 never (default 1)",
    "weighting": "examples (weight clients by examples) or uniform (default examples)",
}


def build_parser() -> argparse.ArgumentParser:
    from prism_tf.evaluation import EVAL_NORMS
    from prism_tf.federated import recipe
    from tff_pipelines.program.driver import AUGMENTS, MATCHES, NORMALIZE, TrainConfig
    from tff_pipelines.round.distributor import DISTRIBUTIONS

    choices_of = {
        "method": METHODS, "model": tuple(prism_tf.models.MODELS), "norm": prism_tf.models.zoo.NORMS,
        "strategy": prism_tf.STRATEGIES, "distribution": DISTRIBUTIONS, "weighting": ("examples", "uniform"),
        "eval_norm": EVAL_NORMS, "lr_schedule": recipe.SCHEDULES, "augment": AUGMENTS, "normalize": NORMALIZE,
        "match": MATCHES,
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
        train.add_argument(flag, type=kind, default=field.default, help=_FIELD_HELP.get(field.name, ""),
                           metavar="{" + ",".join(choices) + "}" if choices else field.name.upper(), choices=choices)
    train.add_argument("--out", required=True, help="run directory (config, metrics.jsonl, checkpoints, plot)")
    train.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    again = commands.add_parser("resume", help="continue a stopped run from its last checkpoint",
                                description="Continue a run from its latest checkpoint.")
    again.add_argument("--out", required=True, help="run directory of the run to continue")
    again.add_argument("--rounds", type=int, default=None, help="new total number of rounds (default: as before)")
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
            summary = driver.resume(args.out, args.rounds)
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
