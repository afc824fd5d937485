"""Test-session setup shared by all tests.

The repo root goes on sys.path so `tff_pipelines` and `prism_tf` import without installing the project.
Importing `tff_pipelines` starts our own TFF worker and installs its context (see tff_pipelines/runtime.py);
the session fixture below makes that explicit and stops the worker when the session ends, so a test run never
leaves a worker_binary behind (an orphan would hold CI's stdout pipe open and hang the job).
"""

from __future__ import annotations

import signal
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def _end_session_on_signal(signum: int, frame: types.FrameType | None) -> None:
    # tff_pipelines.runtime's handler stops the worker, then chains to this one. Its own `sys.exit` would be
    # caught by pytest as one failing test and the run would go on (against a stopped worker); `pytest.exit`
    # ends the whole session instead, with the conventional status.
    pytest.exit(f"received signal {signum}", returncode=128 + signum)


# Installed before tff_pipelines is imported, so that the runtime's handler chains to it.
if threading.current_thread() is threading.main_thread():
    for _signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(_signum) == signal.SIG_DFL:
            signal.signal(_signum, _end_session_on_signal)

import tff_pipelines  # noqa: E402,F401  (installs the local TFF context at collection time)
from tff_pipelines import runtime  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def tff_local_runtime() -> Iterator[None]:
    """Our TFF worker for the whole session (pytest runs fixtures and tests in the main thread)."""
    runtime.install_local_context()
    yield
    runtime.shutdown()
