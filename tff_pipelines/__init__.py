"""prism-tf on TensorFlow Federated: what needs TFF, and nothing else (docs/design.md, "Where things live").

- `tff_pipelines.round`: the TFF computations of one PriSM round (layout, distributor, client work, aggregator,
  finalizer) and the learning process they compose (`build_prism_process`).
- `tff_pipelines.workers`: the TFF worker processes the rounds run in (the local worker's lifecycle, remote
  workers, the loopback bind shim).
- `tff_pipelines.program`: the entry points (``python -m tff_pipelines``, the simulation driver).

A run's description without TFF (options, methods, replay, run directory, data) is `prism_tf.federated`, which the
exporter shares. Importing this package imports nothing and starts nothing; importing a module of `round` installs
our worker context (a worker process starts at the first computation, `tff_pipelines.workers.runtime`).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["PrismProcess", "build_prism_process"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("tff_pipelines.round.process"), name)
    raise AttributeError(f"module 'tff_pipelines' has no attribute {name!r}")
