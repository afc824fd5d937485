"""Measure the two ways of sending sub-models, in one run: `federated_select` vs broadcast + gather.

    .venv/bin/python bench/distribution.py [--width 16] [--clients 5] [--rounds 3]

Prints seconds per round for each (after a warm-up round that traces the computations), their ratio, and the
bytes a client receives in a deployment (identical for both: the simulation shortcut changes no numbers).
"""

from __future__ import annotations

import argparse
import collections
import time

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import prism_tf  # noqa: E402
from prism_tf.federated.methods import Method  # noqa: E402
from tff_pipelines.round import distributor  # noqa: E402
from tff_pipelines.round.process import build_prism_process  # noqa: E402
from tff_pipelines.workers import runtime  # noqa: E402,F401  (installs our TFF worker context)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--keep-ratio", type=float, default=0.2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    datasets = [
        tf.data.Dataset.from_tensor_slices(collections.OrderedDict(
            x=rng.random((args.examples, 32, 32, 3), dtype=np.float32),
            y=rng.integers(0, 10, args.examples).astype(np.int32))).batch(args.batch_size, drop_remainder=True)
        for _ in range(args.clients)]
    seconds, down = {}, {}
    for distribution in ("select", "broadcast"):
        process = build_prism_process(lambda: prism_tf.models.resnet18(width=args.width),
                                      method=Method("prism", keep_ratio=args.keep_ratio), batch_size=args.batch_size,
                                      model_distributor=distributor.named(distribution))
        state = process.initialize()
        state, metrics = process.next(state, datasets)  # warm-up: traces the computations
        began = time.perf_counter()
        for _ in range(args.rounds):
            state, metrics = process.next(state, datasets)
        seconds[distribution] = (time.perf_counter() - began) / args.rounds
        down[distribution] = metrics["bytes_down_per_client"]
        print(f"{distribution:>9}: {seconds[distribution]:.2f} s/round, {down[distribution]:,.0f} bytes down/client",
              flush=True)
    print(f"select / broadcast time ratio: {seconds['select'] / seconds['broadcast']:.2f} "
          f"(resnet18 width {args.width}, {args.clients} clients x {args.examples} examples, keep {args.keep_ratio})")


if __name__ == "__main__":
    import prism_tf.quiet

    prism_tf.quiet.import_tensorflow()  # TensorFlow without its CPU-only start-up noise
    main()
