"""Record the golden values of `tests/golden/runs.py` (run from the repository root, before a refactor):

    .venv/bin/python tests/golden/record.py
"""

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: `golden`, `shapes`

from shapes import make_shapes_dataset  # noqa: E402

from golden import runs  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_shapes_dataset(tmp / "shapes")
        results = {}
        for method in runs.METHODS:
            results[method] = runs.run_method(data, method, tmp / method)
            print(method, results[method]["metrics"][-1].get("eval_accuracy"), flush=True)
        results["export_round"] = runs.export_round(data, tmp / "export")
        print("export_round", len(results["export_round"]["weights"]), flush=True)
        runs.save(results, Path(__file__).resolve().parent)


if __name__ == "__main__":
    main()
