"""How much of a trained PriSM server model is useful: its top-k principal sub-models, scored side by side.

    .venv/bin/python bench/rank_sweep.py --run RUN_DIR [--out FILE.json]

Loads the run's latest checkpoint and scores, on the whole test set with recalibrated BatchNorm statistics, the
server model restricted to its top ``keep`` share of principal kernels per layer (`strategy="top"`), for keep in
0.1 … 1.0 (1.0 is the full server model). If a truncated model beats the full one, the kernels the clients rarely
trained are adding noise rather than capacity (docs/algorithm.md §6).
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
    import prism_tf
    from prism_tf import evaluation
    from tff_pipelines.program import driver

    simulation, state, round_num = driver.load_run(options.run, eval_examples=None, eval_norm="recalibrate")
    server = simulation.process.assign_to(state)
    calibration = simulation.calibration()
    results = dict(run=str(options.run), round=round_num, keep={})
    for keep in (0.1, 0.2, 0.3, 0.5, 0.7, 1.0):
        model = server if keep == 1.0 else prism_tf.extract(server, prism_tf.sample(server, keep, 0, "top"))
        accuracy = evaluation.evaluate(model, simulation.x_test, simulation.y_test, norm="recalibrate",
                                       calibration=calibration, preprocess=simulation.preprocess)[1]
        results["keep"][str(keep)] = accuracy
        print(f"top {keep:.1f} of the principal kernels: test accuracy {accuracy:.4f}", flush=True)
    text = json.dumps(results, indent=2)
    if options.out:
        Path(options.out).write_text(text)
    return 0


if __name__ == "__main__":
    import prism_tf.quiet

    prism_tf.quiet.import_tensorflow()  # TensorFlow without its CPU-only start-up noise
    sys.exit(main())
