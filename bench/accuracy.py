"""Where PriSM stands: every method at equal client cost, same data split, seeds, rounds and recipe.

    .venv/bin/python bench/accuracy.py --profile quick      # make bench-quick (<= 25 minutes on 2 cores)
    .venv/bin/python bench/accuracy.py --profile full       # make bench (<= 150 minutes on 2 cores)
    .venv/bin/python bench/accuracy.py --profile full --only prism,fedavg --partitions iid

Each configuration is one `python -m tff_pipelines train` run in ``bench/runs/<profile>/<partition>/<name>/``.
The bench resumes: a configuration whose ``summary.json`` exists (with the same arguments) is skipped, one with
checkpoints but no summary is resumed from its last round, so a bench cut short loses at most one round.

Every reported accuracy is checked by an independent path before it is written: the run's final deployed model
(``model.keras``, plain Keras layers) is loaded afresh and scored by Keras ``evaluate`` on the full test set in a
different random order; the bench fails if the two disagree by more than 0.5 pp.

Writes ``bench/results/<profile>/``: ``results.json`` (one record per configuration, its exact command
included), ``README.md`` (the table), ``accuracy_<partition>.png`` (test accuracy per round) and ``cost.png``
(client cost per method relative to the full model).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROUND_LINE = re.compile(r"^\s*\d+\s+[-+\d.]+\s")  # the per-round table of `tff_pipelines train`


@dataclasses.dataclass(frozen=True)
class Profile:
    """A bench budget: the arguments every run shares and the configurations compared."""

    name: str
    common: tuple[str, ...]
    partitions: tuple[str, ...]
    configs: tuple[tuple[str, tuple[str, ...]], ...]
    why: str
    seeds: tuple[int, ...] = ()  # several seeds: each configuration once per seed (`--seed`), mean and spread
    dataset: str = "cifar10"  # the test set of the independent check


# One recipe for every method (the authors' local training, docs/algorithm.md §7).
RECIPE = ("--client-lr", "0.1", "--lr-schedule", "cosine", "--local-epochs", "2", "--batch-size", "32",
          "--augment", "crop_flip", "--normalize", "channel", "--frobenius-decay", "2e-4", "--weight-decay", "5e-4")

SPECTRAL = tuple((f"prism_{s}", ("--method", "prism", "--strategy", s))
                 for s in ("prism", "top", "uniform", "unbiased", "collective"))
PEERS = (
    ("prism_output_keep", ("--method", "prism", "--output-keep", "0.5")),
    ("fedavg", ("--method", "fedavg")),
    ("small", ("--method", "small")),
    ("heterofl", ("--method", "heterofl")),
    ("fjord", ("--method", "fjord")),
    ("fed_dropout", ("--method", "fed_dropout")),
    ("fedrolex", ("--method", "fedrolex")),
    ("fedhm", ("--method", "fedhm")),
)

QUICK_COMMON = ("--model", "resnet18", "--width", "16", "--clients", "20", "--clients-per-round", "5",
                "--examples-per-client", "500", "--rounds", "15", "--eval-every", "5", "--keep-ratio", "0.2",
                "--seed", "0", *RECIPE)
FULL_COMMON = ("--model", "resnet18", "--width", "16", "--clients", "50", "--clients-per-round", "5",
               "--examples-per-client", "400", "--rounds", "30", "--eval-every", "5", "--keep-ratio", "0.2",
               "--seed", "0", *RECIPE)


def quick_for(rounds: int, eval_every: int) -> tuple[str, ...]:
    """The quick settings with another number of rounds (the cosine schedule spans them) and evaluation interval."""
    flags = dict(zip(QUICK_COMMON[::2], QUICK_COMMON[1::2], strict=False))
    assert len(QUICK_COMMON) % 2 == 0 and len(flags) * 2 == len(QUICK_COMMON)  # flag-value pairs, each flag once
    flags.update({"--rounds": str(rounds), "--eval-every": str(eval_every)})
    return tuple(x for pair in flags.items() for x in pair)


# What each part of the recipe changes: the full recipe minus one part (later flags override the shared ones).
RECIPE_PARTS = (
    ("no_cosine", ("--lr-schedule", "constant")),
    ("no_decay", ("--frobenius-decay", "0", "--weight-decay", "0")),
    ("no_augment", ("--augment", "none")),
    ("no_normalize", ("--normalize", "none")),
    ("old_recipe", ("--client-lr", "0.05", "--local-epochs", "1", "--lr-schedule", "constant", "--augment", "none",
                    "--normalize", "none", "--frobenius-decay", "0", "--weight-decay", "0")),
)

# The comparisons the targets need first (PriSM, the full model, the small model, HeteroFL, the NeurIPS'24
# strategies), then the rest.
_FIRST = ("prism_prism", "fedavg", "small", "heterofl", "prism_collective", "prism_unbiased")
# FedHM's selection rule is PriSM's `top` strategy (every client the same top-k kernels; `Method("fedhm")` is
# `prism` with strategy `top`): the full bench runs it once, as `prism_top`, and reports it for both names.
FULL_ORDER = tuple(sorted((c for c in SPECTRAL + PEERS if c[0] != "fedhm"),
                          key=lambda c: _FIRST.index(c[0]) if c[0] in _FIRST else len(_FIRST)))

PROFILES = {
    "quick": Profile(
        "quick",
        QUICK_COMMON,
        ("iid",),
        (SPECTRAL[0], ("fedavg", ("--method", "fedavg")), ("small", ("--method", "small")),
         ("heterofl", ("--method", "heterofl")), ("fedrolex", ("--method", "fedrolex"))),
        "a first look in about 20 minutes: PriSM beside the full model, the small model and the two width methods "
        "at equal client flops, IID only",
    ),
    "ablation": Profile(
        "ablation", QUICK_COMMON, ("iid",),
        tuple((f"{m}_{part}", ("--method", m, *flags)) for m in ("prism", "fedavg") for part, flags in RECIPE_PARTS),
        "what each part of the authors' recipe changes for PriSM and FedAvg at the quick budget (compare with "
        "`prism_prism` and `fedavg` of the quick profile)",
    ),
    "study": Profile(
        "study", QUICK_COMMON, ("iid",),
        (("prism_keep1", ("--method", "prism", "--keep-ratio", "1.0")),
         ("prism_gamma1", ("--method", "prism", "--gamma", "1")),
         ("prism_top", ("--method", "prism", "--strategy", "top")),
         ("prism_w32", ("--method", "prism", "--width", "32")),
         ("small_w32", ("--method", "small", "--width", "32"))),
        "why PriSM learns slower than a small model at equal flops: the factorized model at full rank (keep 1.0), "
        "more exploration (gamma 1), no sampling (top), and a wider server model (width 32) against its own small "
        "model at equal flops",
    ),
    "rounds": Profile(
        "rounds",
        quick_for(60, 10),
        ("iid",),
        (SPECTRAL[0], ("small", ("--method", "small")), ("fedavg", ("--method", "fedavg"))),
        "does the gap between PriSM and the small model shrink with rounds? The quick settings for 60 rounds",
    ),
    # The beyond-CNNs profiles (docs/algorithm.md §1): 3 seeds each, the methods that answer "is PriSM nearer to
    # FedAvg on these models than on ResNet-18?", PriSM with the authors' gamma for the model family.
    "transformer": Profile(
        "transformer",
        ("--model", "vit", "--width", "64", "--clients", "20", "--clients-per-round", "5", "--examples-per-client",
         "500", "--rounds", "15", "--eval-every", "5", "--keep-ratio", "0.2", *RECIPE),
        ("iid",),
        (("prism_prism", ("--method", "prism", "--gamma", "3")), ("fedavg", ("--method", "fedavg")),
         ("small", ("--method", "small")),
         ("prism_attention", ("--method", "prism", "--gamma", "3", "--attention", "factorized")),
         ("small_attention", ("--method", "small", "--attention", "factorized"))),
        "a CIFAR ViT (patch 4, 64 wide, 4 pre-norm blocks, 2 heads, MLP ratio 2) at the quick budget: PriSM as the "
        "authors run DeiT (MLPs factorized, attention whole, gamma 3) and with its attention factorized too, "
        "beside FedAvg and the small model at PriSM's client flops (`small_attention`: matched to the cheaper "
        "PriSM with factorized attention; a width method can slice only the MLPs' hidden units here: the residual "
        "stream feeds attention, which no channel slice passes)",
        seeds=(0, 1, 2),
    ),
    "recurrent": Profile(
        "recurrent",
        ("--model", "framelstm", "--width", "128", "--dataset", "cifar10_rows", "--clients", "20",
         "--clients-per-round", "5", "--examples-per-client", "500", "--rounds", "15", "--eval-every", "5",
         "--keep-ratio", "0.2", "--client-lr", "0.1", "--lr-schedule", "cosine", "--local-epochs", "2",
         "--batch-size", "32", "--frobenius-decay", "2e-4", "--weight-decay", "5e-4"),
        ("iid",),
        (("prism_prism", ("--method", "prism", "--gamma", "2.5")), ("fedavg", ("--method", "fedavg")),
         ("small", ("--method", "small"))),
        "a two-layer LSTM (hidden 128) reading CIFAR-10 images row by row (32 steps of 96 features, the "
        "sequential-CIFAR task; the offline character task stays at the unigram plateau for every method at this "
        "budget): PriSM with the authors' LSTM gamma 2.5 beside FedAvg and the small model at PriSM's client flops "
        "(the width methods have no channel group to slice: an LSTM's state stays whole)",
        seeds=(0, 1, 2),
        dataset="cifar10_rows",
    ),
    # Issue 25's levers (docs/bench.md "Levers"): the quick budget, 3 seeds, PriSM's variants at its own client
    # flops beside `small` and FedAvg, in float32 and mixed bfloat16.
    "levers": Profile(
        "levers", QUICK_COMMON, ("iid",),
        (SPECTRAL[0], ("small", ("--method", "small")), ("fedavg", ("--method", "fedavg")),
         ("prism_bf16", ("--method", "prism", "--precision", "mixed_bfloat16")),
         ("small_bf16", ("--method", "small", "--precision", "mixed_bfloat16")),
         ("fedavg_bf16", ("--method", "fedavg", "--precision", "mixed_bfloat16")),
         ("prism_warmup", ("--method", "prism", "--warmup-rounds", "3")),
         ("prism_flops", ("--method", "prism", "--rank-allocation", "flops")),
         ("prism_flops05", ("--method", "prism", "--rank-allocation", "flops:0.5")),
         ("prism_fedavgm", ("--method", "prism", "--server-lr", "1.0", "--server-momentum", "0.9")),
         ("prism_fedadam", ("--method", "prism", "--server-optimizer", "adam", "--server-lr", "0.01")),
         ("prism_balance", ("--method", "prism", "--kernel-lr-balance", "10")),
         # GroupNorm last: Keras's GroupNormalization makes a round 3.5x slower on these CPUs
         ("prism_group", ("--method", "prism", "--norm", "group")),
         ("small_group", ("--method", "small", "--norm", "group")),
         ("fedavg_group", ("--method", "fedavg", "--norm", "group"))),
        "which lever moves PriSM toward the small model at equal client flops (quick budget, 3 seeds): GroupNorm "
        "for every method, a server optimizer on the rebuilt kernels, warm-up, flops-aware rank allocation, and "
        "mixed bfloat16 training against float32",
        seeds=(0, 1, 2),
    ),
    # Issue 25's follow-up: the levers' best PriSM against its peers at the full budget with 3 seeds, and PriSM
    # against `small` over 100 rounds (both resumable across sittings: a run cut short resumes from its checkpoint).
    "levers_full": Profile(
        "levers_full",
        FULL_COMMON,
        ("iid", "dirichlet:0.5"),
        (SPECTRAL[0], ("small", ("--method", "small")), ("heterofl", ("--method", "heterofl")),
         ("fedavg", ("--method", "fedavg"))),
        "PriSM (no lever of the levers profile beat its plain form at the quick budget) against small, HeteroFL "
        "and FedAvg at the full bench's budget, both partitions, 3 seeds",
        seeds=(0, 1, 2),
    ),
    "long": Profile(
        "long",
        quick_for(100, 10),
        ("iid",),
        (SPECTRAL[0], ("small", ("--method", "small"))),
        "does PriSM catch up with the small model given 100 rounds? The quick settings, 3 seeds",
        seeds=(0, 1, 2),
    ),
    "full": Profile(
        "full",
        FULL_COMMON,
        ("iid", "dirichlet:0.5"),
        FULL_ORDER,
        "every strategy and peer on both partitions within 150 minutes on 2 CPU cores: ResNet-18 at width 16 "
        "(0.70 M parameters; width 64 costs 13x more per image here and would allow two rounds per run)",
    ),
}


def run_dir(profile: Profile, partition: str, name: str, seed: int | None = None) -> Path:
    path = ROOT / "bench" / "runs" / profile.name / partition.replace(":", "_") / name
    return path if seed is None else path / f"seed{seed}"


def train_args(profile: Profile, partition: str, extra: tuple[str, ...], seed: int | None = None) -> list[str]:
    return [*profile.common, "--partition", partition, *extra, *(() if seed is None else ("--seed", str(seed)))]


def is_done(path: Path, args: list[str]) -> bool:
    done = path / "summary.json"
    recorded = path / "bench_args.json"
    return done.exists() and recorded.exists() and json.loads(recorded.read_text()) == args


def run_one(path: Path, args: list[str], label: str) -> None:
    """Train (or resume) one configuration, echoing its per-round lines with ``label``."""
    python = sys.executable
    resumable = (path / "checkpoints").exists() and (path / "bench_args.json").exists() and json.loads(
        (path / "bench_args.json").read_text()) == args and not (path / "summary.json").exists()
    if resumable:
        command = [python, "-m", "tff_pipelines", "resume", "--out", str(path)]
    else:
        command = [python, "-m", "tff_pipelines", "train", *args, "--out", str(path), "--overwrite"]
        path.mkdir(parents=True, exist_ok=True)
        (path / "bench_args.json").write_text(json.dumps(args))
    print(f"{label} $ {' '.join(command[1:])}", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env) as child:
        for line in child.stdout:
            line = line.rstrip()
            if ROUND_LINE.match(line) or line.startswith(("round ", "error", "resuming", "Traceback")):
                print(f"{label} {line}", flush=True)
        code = child.wait()
    if code != 0:
        raise SystemExit(f"{label} failed with exit code {code}; see {path}")


def independent_accuracy(path: Path, x_test, y_test) -> float:
    """Keras's own evaluate of the saved deployed model, test set in another random order (token inputs as they
    are; a label per step: Keras's accuracy over every step)."""
    import numpy as np
    import tensorflow as tf

    import prism_tf.models  # noqa: F401  (registers the zoo's own layers, e.g. the ViT's PositionEmbedding)
    from prism_tf.evaluation import batch_norm_layers, canonical_order
    from prism_tf.federated.rundir import RunDir

    model = tf.keras.models.load_model(RunDir(path).model_path, compile=False)
    config = RunDir(path).read_config()
    order = np.random.default_rng(2024).permutation(len(x_test))
    x, y = x_test[order], y_test[order]
    if x.dtype == np.uint8:
        x = preprocess(x, config, path)
    if config.get("eval_norm") == "batch" and batch_norm_layers(model):
        # per-batch statistics: Keras in training mode on batches of 500, moving statistics not written back
        order = canonical_order(x_test[order], y, config.get("seed", 0))
        x, y = x[order], y[order]
        hits = 0
        for i in range(0, len(x) - len(x) % 500, 500):
            hits += int((model(x[i:i + 500], training=True).numpy().argmax(-1) == y[i:i + 500]).sum())
        return hits / (len(x) - len(x) % 500)
    model.compile(loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return float(model.evaluate(x, y, batch_size=500, verbose=0)[1])


def preprocess(x, config: dict, path: Path):
    """The run's input scaling, recomputed from its config (uint8 / 255, then its channel normalization)."""
    import numpy as np

    from prism_tf.federated.rundir import RunDir

    x = x.astype(np.float32) / 255.0
    stats = RunDir(path).read_input_stats()
    if config.get("normalize", "none") != "none" and stats is not None:
        x = (x - np.asarray(stats["mean"], np.float32)) / np.asarray(stats["std"], np.float32)
    return x


def record(profile: Profile, partition: str, name: str, path: Path, args: list[str], x_test, y_test,
           seed: int | None = None) -> dict:
    from prism_tf.federated.config import stored_config
    from prism_tf.federated.rundir import RunDir

    run = RunDir(path)
    summary, rows, config = run.read_summary(), run.read_metrics(), run.read_config()
    method = stored_config(run).method_spec()
    full_test = config.get("eval_examples") in (None, len(x_test))
    check = independent_accuracy(path, x_test, y_test)
    final = summary["final_accuracy"]
    if full_test and abs(check - final) > 0.005:
        raise SystemExit(f"{name} ({partition}): reported accuracy {final:.4f} but Keras evaluate of the saved "
                         f"model gives {check:.4f}: the evaluation is wrong, not the result")
    last = rows[-1]
    return dict(
        name=name, partition=partition, seed=seed, method=config["method"],
        strategy=getattr(method, "strategy", None),  # the sampling rule of spectral methods (FedHM: top)
        keep_ratio=config["keep_ratio"], rounds=summary["rounds"], final_accuracy=final,
        best_accuracy=summary["best_accuracy"], independent_accuracy=check,
        final_accuracy_server=rows[-1].get("eval_accuracy_server"),
        flops_ratio=summary["flops_ratio"], bytes_down_ratio=summary["bytes_down_ratio"],
        bytes_up_ratio=summary["bytes_up_ratio"],
        activation_ratio=last["client_activation_bytes_per_example"] / last["full_activation_bytes_per_example"],
        params_ratio=summary.get("params_ratio"), budget=summary.get("budget"),
        seconds_per_round=summary["mean_round_seconds"],
        curve=[(r["round"], r["eval_accuracy"]) for r in rows if r.get("eval_accuracy") is not None],
        command="python -m tff_pipelines train " + " ".join(args) + f" --out {path.relative_to(ROOT)}",
    )


def write_results(profile: Profile, records: list[dict], seconds: float) -> Path:
    out = ROOT / "bench" / "results" / profile.name
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(dict(profile=profile.name, common=list(profile.common),
                                                      records=records, bench_seconds=seconds), indent=2))
    lines = [f"# bench `{profile.name}`", "", f"Purpose: {profile.why}.", "",
             "Command: `" + " ".join(["python", "bench/accuracy.py", "--profile", profile.name]) + "`", "",
             "Shared arguments: `" + " ".join(profile.common) + "`", "",
             "| partition | config | method | strategy | final acc | best acc | indep. check | server model | flops | "
             "params | down | up | activations | s/round |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(
            f"| {r['partition']} | {r['name']} | {r['method']} | {r['strategy'] or ''} | {_pct(r['final_accuracy'])}"
            f" | {_pct(r['best_accuracy'])} | {_pct(r['independent_accuracy'])} | {_pct(r['final_accuracy_server'])} | "
            f"{r['flops_ratio']:.3f} | "
            f"{_ratio(r['params_ratio'])} | {r['bytes_down_ratio']:.3f} | {r['bytes_up_ratio']:.3f} | "
            f"{r['activation_ratio']:.3f} | {r['seconds_per_round']:.1f} |")
    lines += ["", "Cost columns are per client and example, relative to the full model (`prism_tf.cost`). "
              "`indep. check`: Keras `evaluate` of the saved deployed model on the test set in another order. "
              "`server model`: the full server model, where the deployed model is the widest trained slice "
              "(HeteroFL, FjORD).", ""]
    if any(r["name"] == "prism_top" for r in records) and not any(r["name"] == "fedhm" for r in records):
        lines += ["FedHM is the `prism_top` row: its selection rule (the same top-k principal kernels for every "
                  "client, a fixed low-rank sub-model) is PriSM's `top` strategy.", ""]
    if profile.seeds:
        lines += seed_summary(records)
        lines += rounds_over_seeds(records)
    (out / "README.md").write_text("\n".join(lines))
    plot(out, records)
    return out


def seed_summary(records: list[dict]) -> list[str]:
    """Mean, standard deviation and range over seeds of every configuration's final accuracy, and its difference
    to FedAvg's and to the small model's (per seed: the same data split and initialization)."""
    import numpy as np

    groups: dict[tuple[str, str], dict[int, dict]] = {}
    for r in records:
        groups.setdefault((r["partition"], r["name"]), {})[r["seed"]] = r
    lines = ["## Over seeds", "",
             "| partition | config | seeds | final acc mean ± std | min – max | vs fedavg (per seed) | vs small "
             "(per seed) | flops |", "|---|---|---|---|---|---|---|---|"]

    def gap(partition: str, name: str, other: str) -> str:
        mine, theirs = groups[(partition, name)], groups.get((partition, other), {})
        common = sorted(set(mine) & set(theirs))
        if not common or name == other:
            return "-"
        return _per_seed([mine[s]["final_accuracy"] - theirs[s]["final_accuracy"] for s in common])

    for (partition, name), by_seed in groups.items():
        acc = np.array([r["final_accuracy"] for r in by_seed.values()]) * 100
        flops = np.mean([r["flops_ratio"] for r in by_seed.values()])
        spread = acc.std(ddof=1) if len(acc) > 1 else 0.0
        lines.append(f"| {partition} | {name} | {len(acc)} | {acc.mean():.1f} ± {spread:.1f}"
                     f" | {acc.min():.1f} – {acc.max():.1f} | {gap(partition, name, 'fedavg')} | "
                     f"{gap(partition, name, 'small')} | {flops:.3f} |")
    lines += ["", "Differences are in percentage points, seed by seed (same split and initialization); a difference "
              "inside the seeds' spread is not a result.", ""]
    return lines


def _per_seed(differences: list[float]) -> str:
    """Accuracy differences (fractions) in percentage points: the mean, then each seed's (``-8.5 (-8.2, -9.7)``)."""
    points = [100 * d for d in differences]
    return f"{sum(points) / len(points):+.1f} ({', '.join(f'{v:+.1f}' for v in points)})"

def rounds_over_seeds(records: list[dict]) -> list[str]:
    """Test accuracy at every evaluated round, mean ± standard deviation over seeds, per partition and configuration
    (only rounds every seed of the configuration evaluated); and the gap to the small model, seed by seed."""
    import numpy as np

    lines = []
    for partition in sorted({r["partition"] for r in records}):
        curves: dict[str, dict[int, dict[int, float]]] = {}
        for r in records:
            if r["partition"] == partition and r["curve"]:
                curves.setdefault(r["name"], {})[r["seed"]] = {int(k): v for k, v in r["curve"]}
        rounds = [set(c) for by_seed in curves.values() for c in by_seed.values()]
        common = sorted(set.intersection(*rounds)) if rounds else []
        if len(common) < 2:
            continue
        lines += [f"## Per round over seeds ({partition})", "",
                  "| config | " + " | ".join(f"round {k}" for k in common) + " |",
                  "|---|" + "---|" * len(common)]
        for name, by_seed in curves.items():
            cells = []
            for k in common:
                acc = np.array([c[k] for c in by_seed.values()]) * 100
                cells.append(f"{acc.mean():.1f} ± {acc.std(ddof=1):.1f}" if len(acc) > 1 else f"{acc[0]:.1f}")
            lines.append(f"| {name} (n={len(by_seed)}) | " + " | ".join(cells) + " |")
        small = curves.get("small", {})
        for name, by_seed in curves.items():
            seeds = sorted(set(by_seed) & set(small))
            if name == "small" or not seeds:
                continue
            cells = []
            for k in common:
                cells.append(_per_seed([by_seed[s][k] - small[s][k] for s in seeds]))
            lines.append(f"| {name} − small, per seed | " + " | ".join(cells) + " |")
        lines.append("")
    return lines

def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _ratio(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def final_plot(out: Path, records: list[dict], partition: str, names: list[str], colours) -> None:
    """Final accuracy per configuration over seeds: each seed a dot, the mean a bar with ± one standard deviation."""
    import matplotlib.pyplot as plt
    import numpy as np

    shown = [n for n in names if any(r["name"] == n for r in records)]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(shown) + 1.2))
    for i, name in enumerate(shown):
        values = [100 * r["final_accuracy"] for r in records if r["name"] == name]
        ax.barh(i, np.mean(values), xerr=np.std(values) if len(values) > 1 else None, color=colours(
            names.index(name) % colours.N), alpha=0.5, capsize=3)
        ax.plot(values, [i] * len(values), "k.", ms=5)
        ax.text(max(values) + 0.5, i, f"{np.mean(values):.1f} (n={len(values)})", va="center", fontsize=7)
    ax.set_yticks(range(len(shown)), shown, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="final test accuracy (%)", title=f"final accuracy over seeds ({partition}): dots are seeds, "
           "bars mean ± std")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(out / f"final_{partition.replace(':', '_')}.png", dpi=120)
    plt.close(fig)


def plot(out: Path, records: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["name"] for r in records))  # one colour per configuration, a style per seed
    colours = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    seeds = sorted({r.get("seed") for r in records}, key=lambda v: -1 if v is None else v)
    for partition in sorted({r["partition"] for r in records}):
        fig, ax = plt.subplots(figsize=(9, 4.8))
        labelled = set()
        for r in (r for r in records if r["partition"] == partition):
            rounds, acc = zip(*r["curve"], strict=True) if r["curve"] else ((), ())
            seed = r.get("seed")
            ax.plot(rounds, acc, "o" + ("-", "--", ":", "-.")[seeds.index(seed) % 4], ms=3,
                    color=colours(names.index(r["name"]) % colours.N),
                    label=None if r["name"] in labelled else r["name"])
            labelled.add(r["name"])
        styles = "" if len(seeds) < 2 else " (line style: seed " + ", ".join(
            f"{s} {('solid', 'dashed', 'dotted', 'dash-dot')[i % 4]}" for i, s in enumerate(seeds)) + ")"
        ax.set(xlabel="round", ylabel="test accuracy", title=f"test accuracy per round ({partition}){styles}")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        fig.savefig(out / f"accuracy_{partition.replace(':', '_')}.png", dpi=120)
        plt.close(fig)
        if len(seeds) > 1:
            final_plot(out, [r for r in records if r["partition"] == partition], partition, names, colours)
    first = [r for r in records
             if r["partition"] == records[0]["partition"] and r.get("seed") == records[0].get("seed")]
    fig, ax = plt.subplots(figsize=(8, 4))
    names = [r["name"] for r in first]
    keys = (("flops_ratio", "flops"), ("bytes_down_ratio", "bytes down"), ("activation_ratio", "activations"))
    for j, (key, label) in enumerate(keys):
        ax.bar([i + 0.27 * (j - 1) for i in range(len(first))], [r[key] for r in first], width=0.27, label=label)
    ax.set_xticks(range(len(first)), names, rotation=45, ha="right", fontsize=8)
    ax.set(ylabel="per client, relative to the full model", title="client cost per method")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "cost.png", dpi=120)
    plt.close(fig)


def test_set(profile: Profile):
    """The test set every run of ``profile`` is scored on, loaded by the driver's own loader."""
    from prism_tf.federated import data as data_lib
    from prism_tf.federated import sequences

    if sequences.is_sequence_dataset(profile.dataset):
        common = list(profile.common)
        length = int(common[common.index("--sequence-length") + 1]) if "--sequence-length" in common else None
        clients = int(common[common.index("--clients") + 1])
        dataset = sequences.load_sequences(profile.dataset, length=length, clients=clients)
    else:
        dataset = data_lib.load_dataset(profile.dataset)
    return dataset.x_test, dataset.y_test


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--only", help="comma-separated configuration names to train (default: all of the "
                        "profile); the report still covers every finished run of the profile")
    parser.add_argument("--partitions", help="comma-separated partitions (default: the profile's)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    parser.add_argument("--report-only", action="store_true",
                        help="write results.json and README.md from the finished runs only; train nothing")
    options = parser.parse_args()
    profile = PROFILES[options.profile]
    partitions = options.partitions.split(",") if options.partitions else list(profile.partitions)
    wanted = set(options.only.split(",")) if options.only else None
    # Configuration by configuration, both partitions each: a bench cut short still compares its methods on both.
    # With seeds: seed by seed, every configuration of a seed before the next seed, so a bench cut short has
    # complete comparisons for the seeds it finished.
    everything = [(p, name, extra, seed) for seed in (profile.seeds or (None,)) for name, extra in profile.configs
                  for p in partitions]
    plan = [item for item in everything if wanted is None or item[1] in wanted]
    if options.dry_run:
        for p, name, extra, seed in plan:
            print(" ".join(["python -m tff_pipelines train", *train_args(profile, p, extra, seed), "--out",
                            str(run_dir(profile, p, name, seed).relative_to(ROOT))]))
        return 0
    x_test, y_test = test_set(profile)
    began = time.time()
    records = []
    # The report covers every finished run of the profile: `--only` chooses what to train, not what to report.
    for i, (partition, name, extra, seed) in enumerate(everything, 1):
        path, args = run_dir(profile, partition, name, seed), train_args(profile, partition, extra, seed)
        label = f"[{i}/{len(everything)} {partition} {name}{'' if seed is None else f' seed {seed}'}]"
        if is_done(path, args):
            print(f"{label} done before, kept", flush=True)
        elif (partition, name, extra, seed) not in plan:
            continue
        elif options.report_only:
            print(f"{label} not finished, left out", flush=True)
            continue
        else:
            run_one(path, args, label)
        records.append(record(profile, partition, name, path, args, x_test, y_test, seed))
        r = records[-1]
        print(f"{label} final {_pct(r['final_accuracy'])}% (independent {_pct(r['independent_accuracy'])}%), "
              f"flops {r['flops_ratio']:.3f}x, {r['seconds_per_round']:.1f} s/round", flush=True)
        write_results(profile, records, time.time() - began)
    out = write_results(profile, records, time.time() - began)
    print(f"results: {out}/results.json, {out}/README.md, plots in {out}/")
    return 0


if __name__ == "__main__":
    import prism_tf.quiet

    prism_tf.quiet.import_tensorflow()  # TensorFlow without its CPU-only start-up noise
    sys.exit(main())
