"""prism-tf pipelines: entry points (CLI, notebooks, tests) for PriSM federated learning on TFF.

Importing this package is cheap and starts nothing: the modules that describe a run without TFF (`config`,
`methods`, `recipe`, `replay`, `data`) import no TFF, so the exporter and device ingest never start a worker.
The first import of a module that builds TFF computations (`process`, `driver`, ...) imports `runtime`, which
starts the local TFF C++ worker under our control: its output goes to a log file, it is stopped at exit and on
SIGTERM/SIGHUP, and it dies with this process even on SIGKILL (docs/pitfalls.md, the worker process).
Without this, TFF's own worker inherits stdout and outlives the script, so `python -m tff_pipelines ... | cat`
and CI hang.
"""

import importlib
import os

# TensorFlow's C++ INFO/WARNING lines (CUDA probing, oneDNN notices) drown the per-round output; a user's own
# setting wins. Effective only if TensorFlow is not imported yet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_LAZY = {"METHODS": "methods", "Method": "methods", "PrismProcess": "process", "build_prism_process": "process"}
_MODULES = ("runtime", "process", "driver", "config", "methods", "replay", "data", "recipe", "runs")

__all__ = ["METHODS", "Method", "PrismProcess", "build_prism_process", "runtime"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"tff_pipelines.{_LAZY[name]}"), name)
    if name in _MODULES:
        return importlib.import_module(f"tff_pipelines.{name}")
    raise AttributeError(f"module 'tff_pipelines' has no attribute {name!r}")
