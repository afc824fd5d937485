"""The three BatchNorm evaluation modes on one trained model, side by side (docs/algorithm.md, "Evaluation").

    .venv/bin/python bench/eval_modes.py --run RUN_DIR [--out bench/results/eval_modes.json]

Loads the run's latest checkpoint and scores its deployed model on the whole test set with per-batch statistics
(shuffled by content), the clients' moving statistics, and statistics recalibrated on 500 / 1000 / 5000
training examples; each also in the test set's stored (class-sorted) order, to show the order does not matter.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--out", default=None)
    options = parser.parse_args()
    from prism_tf import evaluation
    from tff_pipelines.program import driver

    simulation, state, round_num = driver.load_run(options.run, eval_examples=None)
    config = simulation.config
    model = simulation.deployed_models(state)["deployed"]
    x_sorted, y_sorted = simulation.dataset.x_test, simulation.dataset.y_test
    results = dict(run=str(options.run), round=round_num, method=config.method, test_examples=len(y_sorted))
    orders = dict(stored=(x_sorted, y_sorted), shuffled=(simulation.x_test, simulation.y_test))
    for order_name, (x, y) in orders.items():
        for norm in ("batch", "moving"):
            results[f"{norm}_{order_name}"] = evaluation.evaluate(
                model, x, y, norm=norm, preprocess=simulation.preprocess)[1]
        for n in (500, 1000, 5000):
            calibration = evaluation.calibration_batches(simulation.dataset.x_train, 100, n, config.seed,
                                                         simulation.preprocess)
            results[f"recalibrate{n}_{order_name}"] = evaluation.evaluate(
                model, x, y, norm="recalibrate", calibration=calibration, preprocess=simulation.preprocess)[1]
    # the old default: per-batch statistics over the stored order, without shuffling
    hits = sum(int((model(simulation.preprocess(x_sorted[i:i + 500]), training=True).numpy().argmax(-1)
                    == y_sorted[i:i + 500]).sum()) for i in range(0, len(y_sorted), 500))
    results["batch_unshuffled_stored_order_old_default"] = hits / len(y_sorted)
    text = json.dumps(results, indent=2)
    print(text)
    if options.out:
        Path(options.out).write_text(text)
    return 0


if __name__ == "__main__":
    import prism_tf.quiet

    prism_tf.quiet.import_tensorflow()  # TensorFlow without its CPU-only start-up noise
    sys.exit(main())
