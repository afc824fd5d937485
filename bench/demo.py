"""`make demo`: a first look in about 4.5 minutes on 2 CPU cores, PriSM beside `small` and FedAvg on CIFAR-10.

    .venv/bin/python bench/demo.py              # make demo; runs kept from a previous demo are reused
    .venv/bin/python bench/demo.py --fresh      # train all three again

Three real `python -m tff_pipelines train` runs on the same data split, seeds and recipe (ResNet-18 at width 8, 10
IID clients of 400 CIFAR-10 images, 5 per round, 10 rounds):

- ``prism``: every client trains its own sampled 20% of each layer's principal kernels;
- ``small``: a narrower ResNet-18 trained whole, as cheap per client as a PriSM sub-model (``--match flops``);
- ``fedavg``: the full model on every client, the upper bound that no weak client could afford.

The runs, their independent check and the plot are bench/accuracy.py's: each final accuracy is confirmed by
loading the saved ``model.keras`` afresh and scoring it with Keras ``evaluate`` on the whole test set in another
random order (the demo stops if the two differ by more than 0.5 pp). Everything goes to ``runs/demo/``: one run
directory per method and ``demo.png`` (test accuracy per round, client cost per method).

The demo lives in bench/ beside bench/accuracy.py because it is that bench at a five-minute budget: it imports
its run, check and record functions rather than repeating them, and like the bench it is a script of the
checkout, not part of the installed library.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import accuracy  # bench/accuracy.py: this script's directory is on sys.path when it is run as a script

OUT = accuracy.ROOT / "runs" / "demo"


def _with(args: tuple[str, ...], values: dict[str, str]) -> tuple[str, ...]:
    """``args`` (flag, value pairs) with the given flags' values replaced, so each flag appears once."""
    pairs = list(zip(args[::2], args[1::2], strict=True))
    return tuple(x for flag, value in pairs for x in (flag, values.get(flag, value)))


# The bench's recipe, minus the two parts that cost accuracy in a 10-round run (bench/results/README.md, "What
# each part of the recipe changes"): they pay off over hundreds of rounds.
COMMON = ("--model", "resnet18", "--width", "8", "--dataset", "cifar10", "--clients", "10", "--clients-per-round",
          "5", "--examples-per-client", "400", "--rounds", "10", "--eval-every", "2", "--keep-ratio", "0.2",
          "--seed", "0", "--partition", "iid",
          *_with(accuracy.RECIPE, {"--augment": "none", "--lr-schedule": "constant"}))
METHODS = (("prism", ("--method", "prism")), ("small", ("--method", "small")), ("fedavg", ("--method", "fedavg")))
LABELS = {"prism": "PriSM (keep 0.2)", "small": "small (equal client flops)", "fedavg": "FedAvg (full model)"}
FULL_BENCH = "make bench   # .venv/bin/python bench/accuracy.py --profile full: 12 methods x 2 partitions, <= 150 min"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fresh", action="store_true", help="train every run again (default: reuse finished runs)")
    options = parser.parse_args(argv)

    from prism_tf.federated import data as data_lib

    began = time.time()
    print("make demo: PriSM beside `small` (equal client flops) and FedAvg; ResNet-18 w8, CIFAR-10, 10 rounds",
          flush=True)
    dataset = data_lib.load_dataset("cifar10", progress=False)
    print(f"CIFAR-10 from {dataset.source}", flush=True)
    records = []
    for i, (name, extra) in enumerate(METHODS, 1):
        path, args = OUT / name, [*COMMON, *extra]
        label = f"[{i}/{len(METHODS)} {name}]"
        if options.fresh and path.exists():
            shutil.rmtree(path)
        if accuracy.is_done(path, args):
            print(f"{label} finished by an earlier demo, reused (--fresh trains it again)", flush=True)
        else:
            accuracy.run_one(path, args, label)
        records.append(accuracy.record(_PROFILE, "iid", name, path, args, dataset.x_test, dataset.y_test))

    print(f"\n{'method':<28}{'test acc':>9}{'Keras check':>12}{'client flops':>13}{'bytes down':>11}{'s/round':>8}")
    for r in records:
        print(f"{LABELS[r['name']]:<28}{100 * r['final_accuracy']:>8.1f}%{100 * r['independent_accuracy']:>11.1f}%"
              f"{r['flops_ratio']:>12.3f}x{r['bytes_down_ratio']:>10.3f}x{r['seconds_per_round']:>8.1f}")
    print("client cost is per client and example, relative to the full model; 'Keras check': the saved model.keras "
          "reloaded and scored by Keras evaluate on the shuffled test set")
    picture = plot(OUT / "demo.png", records)
    print(f"\ndone in {time.time() - began:.0f} s. Picture: {picture.relative_to(accuracy.ROOT)} (test accuracy per "
          "round, client cost per method)")
    print("At this budget PriSM trails the small model; bench/results/README.md has the measured numbers and why.")
    print(f"Full bench: {FULL_BENCH}")
    return 0


# accuracy.record() takes a profile only for its signature's sake; the demo's arguments are its own.
_PROFILE = accuracy.Profile("demo", COMMON, ("iid",), METHODS, "make demo")


def plot(path: Path, records: list[dict]) -> Path:
    """One picture: test accuracy per round (left) and client cost per method (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw=dict(width_ratios=(3, 2)))
    for r in records:
        rounds, acc = zip(*r["curve"], strict=True)
        left.plot(rounds, [100 * a for a in acc], "o-", ms=4, label=f"{LABELS[r['name']]}: {100 * acc[-1]:.1f}%")
    left.set(xlabel="round", ylabel="test accuracy (%, 10,000 images)", title="CIFAR-10, ResNet-18 w8, 10 IID clients")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    keys = (("flops_ratio", "flops"), ("bytes_down_ratio", "bytes down"), ("activation_ratio", "activations"))
    for j, (key, label) in enumerate(keys):
        bars = right.bar([i + 0.27 * (j - 1) for i in range(len(records))], [r[key] for r in records], width=0.27,
                         label=label)
        right.bar_label(bars, fmt="%.2f", fontsize=7)
    right.set_xticks(range(len(records)), [r["name"] for r in records])
    right.set(ylabel="per client, relative to the full model", title="client cost per method")
    right.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    import prism_tf.quiet

    prism_tf.quiet.import_tensorflow()  # TensorFlow without its CPU-only start-up noise
    sys.exit(main())
