"""prism-tf pipelines: entry points (CLI, notebooks, tests) for PriSM federated learning on TFF.

Importing this package starts the local TFF C++ worker under our control (`tff_pipelines.runtime`): its output
goes to a log file, it is stopped at exit and on SIGTERM/SIGHUP, and it dies with this process even on
SIGKILL.
Without this, TFF's own worker inherits stdout and outlives the script, so `python -m tff_pipelines ... | cat`
and CI hang.
"""

import os

# TensorFlow's C++ INFO/WARNING lines (CUDA probing, oneDNN notices) drown the per-round output; a user's own
# setting wins. Effective only if TensorFlow is not imported yet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tff_pipelines import runtime  # noqa: E402

runtime.install_local_context()

from tff_pipelines.methods import METHODS, Method  # noqa: E402
from tff_pipelines.process import PrismProcess, build_prism_process  # noqa: E402

__all__ = ["METHODS", "Method", "PrismProcess", "build_prism_process", "runtime"]
