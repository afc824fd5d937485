"""Behaviour unchanged by the floor-plan refactor: every method's tiny fixed-seed run, and a round played by two
phones, write what they wrote before it (tests/golden/: recorded on the commit before the move).

Compared exactly: ``metrics.jsonl`` (all but the wall-clock columns) and the saved model's weights. Each case is a
fresh ``python -m tff_pipelines train`` (about a minute), so the suite runs them with `make test-all`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from golden import runs

GOLDEN = runs.load(Path(__file__).resolve().parent / "golden")
pytestmark = pytest.mark.slow


def _same(expected: dict, actual: dict) -> None:
    assert actual["metrics"] == expected["metrics"]
    assert len(actual["weights"]) == len(expected["weights"])
    for i, (want, got) in enumerate(zip(expected["weights"], actual["weights"], strict=True)):
        assert got.shape == want.shape and got.dtype == want.dtype, i
        assert np.array_equal(got, want), f"weight {i}: max |difference| {np.max(np.abs(got - want)):.3g}"


@pytest.mark.parametrize("method", runs.METHODS)
def test_every_method_writes_its_golden_run(shapes_dataset, tmp_path, method):
    _same(GOLDEN[method], runs.run_method(shapes_dataset, method, tmp_path / method))


def test_a_round_with_phones_writes_its_golden_checkpoint(shapes_dataset, tmp_path):
    _same(GOLDEN["export_round"], runs.export_round(shapes_dataset, tmp_path))
