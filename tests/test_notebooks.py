"""Every notebook in notebooks/ executes top to bottom in a fresh kernel, and leaves no TFF worker behind.

The kernel is this interpreter (`sys.executable`, i.e. the venv's python), started from a kernelspec written to a
temporary directory, so nothing installed globally (or a stale `python3` kernelspec) decides which Python runs
the notebook. Cells run with cwd = notebooks/, as in Jupyter. Notebooks import `tff_pipelines`, which starts a
`worker_binary` owned by the kernel; after the kernel shuts down none of the workers that appeared during the
notebook may survive (an orphan would hold CI's pipes open, see tff_pipelines/workers/runtime.py). Zombies do not count
(they hold no pipe, and PID 1 on these machines may be slow to reap them); new workers whose parent is a live
process other than the kernel belong to someone else running in parallel and are ignored.

The notebooks run with ``PRISM_NOTEBOOK_CI=1``, their small-settings switch (tiny widths, few clients and rounds:
about a minute each on 2 cores), two kernels at a time; without it, as a user runs them, they train for a few
minutes.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL_NAME = "prism-tf-test-venv"
CELL_TIMEOUT_S = 600  # generous: a cold CIFAR-10 decode on a loaded 2-core machine; the notebooks need ~1 min
STARTUP_TIMEOUT_S = 180
GRACE_S = 15.0  # time allowed for the kernel's worker to go after the kernel has exited
CI_SWITCH = "PRISM_NOTEBOOK_CI"  # read by the notebooks' first code cell
PARALLEL = 2  # kernels at a time (module fixture `executions`)


def _live_workers() -> dict[int, int]:
    """Running (not zombie) worker_binary processes on the machine (`pgrep -f worker_binary`): pid -> parent pid."""
    out = subprocess.run(["pgrep", "-f", "worker_binary"], capture_output=True, text=True, check=False).stdout
    workers = {}
    for token in out.split():
        pid = int(token)
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0]
        except (OSError, IndexError):
            continue  # gone already
        if fields[0] not in ("Z", "X") and argv0.endswith(b"worker_binary"):
            workers[pid] = int(fields[1])
    return workers


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _kernel_manager(tmp_path: Path) -> KernelManager:
    """A kernel manager whose kernel is exactly this interpreter (the venv's python)."""
    spec_dir = tmp_path / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "prism-tf venv", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    km = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)
    assert km.kernel_spec is not None and km.kernel_spec.argv[0] == sys.executable
    return km


def _execute(nb, km: KernelManager, **hooks) -> None:
    """Run ``nb`` in place in a fresh kernel with cwd = notebooks/; the kernel is shut down before returning.

    nbclient leaves a kernel it did not create running, so the shutdown (graceful: the kernel's atexit handlers
    run, which is how `tff_pipelines` stops its worker) is ours.
    """
    client = NotebookClient(
        nb, km=km, timeout=CELL_TIMEOUT_S, startup_timeout=STARTUP_TIMEOUT_S,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},  # the kernel's cwd
        **hooks)
    try:
        client.execute()
    finally:
        if client.kc is not None:
            client.kc.stop_channels()
        if km.has_kernel:
            km.shutdown_kernel(now=False)
        km.cleanup_resources()


def _error_of(nb) -> str:
    """The first cell with an error output: its source and traceback (ANSI colours stripped)."""
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                trace = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(output.get("traceback", [])))
                return f"cell {index}:\n{cell.source}\n---\n{trace}"
    return ""


def test_notebooks_are_found():
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"


def test_kernel_runs_this_interpreter(tmp_path):
    """The kernel really is `sys.executable` and starts in notebooks/ (checked from inside the kernel)."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import os, sys; print(sys.executable); "
                                                                    "print(os.getcwd())")])
    _execute(nb, _kernel_manager(tmp_path))
    lines = nb.cells[0].outputs[0]["text"].split()
    assert lines == [sys.executable, str(NOTEBOOK_DIR)]


@dataclasses.dataclass
class Execution:
    """One notebook's run in its own kernel: the executed notebook, or why it failed, and the processes seen."""

    nb: Any
    failure: str | None
    elapsed: float
    kernels: set[int]
    kernel_workers: set[int]
    survivors: set[int]


def _run_notebook(path: Path, tmp_path: Path) -> Execution:
    nb = nbformat.read(path, as_version=4)
    before = set(_live_workers())
    kernel_workers: set[int] = set()
    kernels: set[int] = set()
    km = _kernel_manager(tmp_path)

    def on_cell_executed(**_):  # record the kernel and its workers while the kernel is alive
        kernels.add(km.provisioner.pid)
        kernel_workers.update(pid for pid, parent in _live_workers().items() if parent in kernels)

    began = time.perf_counter()
    failure = None
    try:
        _execute(nb, km, on_cell_executed=on_cell_executed)
    except CellTimeoutError as e:
        failure = f"{path.name}: a cell exceeded {CELL_TIMEOUT_S} s\n{e}"
    except CellExecutionError as e:
        failure = f"{path.name} failed after {time.perf_counter() - began:.0f} s\n{_error_of(nb) or e}"
    elapsed = time.perf_counter() - began
    # The kernel has exited: no worker that appeared during the notebook may survive. New workers owned by a
    # live process other than the kernel (the other notebook running beside it, a run elsewhere) are not ours;
    # orphans are.
    deadline = time.monotonic() + GRACE_S
    while True:
        new = {pid: parent for pid, parent in _live_workers().items() if pid not in before}
        survivors = {pid for pid, parent in new.items()
                     if pid in kernel_workers or parent == 1 or not _running(parent)}
        if not survivors or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    return Execution(nb, failure, elapsed, kernels, kernel_workers, survivors)


@pytest.fixture(scope="module")
def executions(tmp_path_factory) -> Iterator[dict[str, concurrent.futures.Future]]:
    """Every notebook, started when the first of their tests starts, `PARALLEL` kernels at a time: a notebook at
    CI settings spends much of its time importing TensorFlow and tracing on one core, so two overlap well."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CI_SWITCH, "1")  # the kernels inherit this process's environment
        with concurrent.futures.ThreadPoolExecutor(PARALLEL, thread_name_prefix="notebook") as pool:
            futures = {p.name: pool.submit(_run_notebook, p, tmp_path_factory.mktemp(p.stem)) for p in NOTEBOOKS}
            yield futures
            for future in futures.values():
                future.cancel()  # a failing early test must not wait for the rest to run


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path: Path, executions):
    run: Execution = executions[path.name].result()
    if run.failure:
        pytest.fail(run.failure)
    nb = run.nb
    assert not _error_of(nb), _error_of(nb)
    blank = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code" and "plt.show()" in cell.source
             and not any("image/png" in o.get("data", {}) for o in cell.outputs)]
    assert not blank, f"{path.name}: cells {blank} call plt.show() but display no figure"
    print(f"{path.name}: executed in {run.elapsed:.1f} s; the kernel's worker_binary: {sorted(run.kernel_workers)}")
    if any("import tff_pipelines" in cell.source for cell in nb.cells if cell.cell_type == "code"):
        assert run.kernel_workers, f"{path.name} imports tff_pipelines but no worker_binary of its kernel was seen"
    for pid in run.kernels:
        assert not _running(pid), f"the kernel (pid {pid}) is still running after its shutdown"
    assert not run.survivors, f"{path.name}: worker_binary outlived the kernel by {GRACE_S} s: {sorted(run.survivors)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path: Path):
    """Notebooks are committed with their outputs cleared (the figures come from executing them, not from git)."""
    nb = nbformat.read(path, as_version=4)
    dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
             and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: code cells {dirty} have stored outputs; clear them before committing"
