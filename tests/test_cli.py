"""End-to-end runs of the command line (`python -m tff_pipelines train|resume`) in subprocesses.

Every run uses a small synthetic class-folder dataset (3 classes of 28x28 grayscale PNGs: noise plus a bright
class-dependent column band) written to a temporary directory, tiny models (width 4), few clients and rounds.
Decoded-data caches go to a temporary `PRISM_CACHE`, never to ~/.cache.

Cost: each CLI process imports TensorFlow + TFF and starts its own TFF worker (about 10 s of CPU before any
work), and a training run traces the process (another 10-20 s). So every command of this module is a job of
the module-scoped `jobs` fixture: run once, up to three at a time, all started when the module's first test
starts (only those the selected tests read), longest chain first; tests then assert on the results.

The last tests are regressions for bugs these tests found (a failed `train` leaving a run behind, `--out` naming
a file, a rejected `resume --rounds 0` damaging the run).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import heapq
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tff_pipelines.program import driver

REPO_ROOT = Path(__file__).resolve().parents[1]

BATCH = 8
EVAL_EXAMPLES = 12

# The partial-batch regression run: clients hold 21 examples (capped from 24), 2 local epochs, 5 rounds.
PARTIAL = dict(per_client=21, epochs=2, rounds=5, per_round=3, eval_examples=10)

TRAIN_TIMEOUT_S = 420  # a training run takes 30-60 s on a loaded 2-core machine
QUICK_TIMEOUT_S = 180  # an invocation that fails during argument/config/data checks
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TOKEN_VAR = "PRISM_CLI_TEST_TOKEN"  # marks the processes a run started (workers inherit the environment)

# Every key of a metrics.jsonl row (eval_* only on evaluated rounds; here every round is evaluated).
ROW_KEYS = (
    "round", "train_loss", "train_accuracy", "num_examples", "kernel_coverage",
    "bytes_down_per_client", "bytes_up_per_client", "full_model_bytes",
    "client_flops_per_example", "full_flops_per_example",
    "client_activation_bytes_per_example", "full_activation_bytes_per_example",
    "clients", "clients_dropped", "round_seconds", "eval_loss", "eval_accuracy",
)
TABLE_HEADER = re.compile(
    r"^\s*round\s+loss\s+train acc\s+test acc\s+coverage\s+down/full\s+flops/full\s+dropped\s+sec\s*$")
TABLE_ROW = re.compile(r"^\s*(\d+)" + r"\s+(-|[-+]?\d+\.\d+)" * 6 + r"\s+(\d+)\s+(\d+\.\d+)\s*$")


# --------------------------------------------------------------------------------------------- helpers


@dataclasses.dataclass
class Result:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    token: str  # the PRISM_CLI_TEST_TOKEN value in the environment of the run (and of its workers)

    def describe(self) -> str:
        return (f"$ {' '.join(self.args)}\nexit {self.returncode} after {self.seconds:.1f} s\n"
                f"--- stdout (tail)\n{self.stdout[-3000:]}\n--- stderr (tail)\n{self.stderr[-5000:]}")


def _env(cache_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PRISM_CACHE"] = str(cache_dir)
    # Test what a user gets by default (oneDNN on), whatever the developer's shell says.
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)
    env.pop("TFF_PIPELINES_WORKER_LOG", None)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    env.update(extra)
    return env


_live: set[subprocess.Popen] = set()  # CLI processes running now (killed if the module ends while they run)
_live_lock = threading.Lock()


def _run(args: list[str], env: dict[str, str], timeout: float) -> Result:
    """Runs a command from the repo root in its own session, with a fresh `PRISM_CLI_TEST_TOKEN` in its env.

    On timeout: kills the session, then any worker_binary carrying the token (processes we started), and fails.
    """
    env = {**env, TOKEN_VAR: uuid.uuid4().hex}
    began = time.monotonic()
    proc = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    with _live_lock:
        _live.add(proc)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_session(proc)
        for pid in _worker_pids():
            if _has_env_token(pid, env[TOKEN_VAR]):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # something outside the session still holds our pipes
            out, err = "", ""
        result = Result(args, proc.returncode if proc.returncode is not None else -9, out, err,
                        time.monotonic() - began, env[TOKEN_VAR])
        pytest.fail(f"timed out after {timeout} s (hung?)\n{result.describe()}")
    finally:
        with _live_lock:
            _live.discard(proc)
    return Result(args, proc.returncode, out, err, time.monotonic() - began, env[TOKEN_VAR])


def _kill_session(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the session we created: its id is the leader's pid


def _cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "tff_pipelines", *argv]


def _train_args(dataset: Path, out: Path, **flags) -> list[str]:
    """`train` argv with the small defaults of this file; keyword flags override (underscores become dashes)."""
    options = dict(dataset=dataset, model="resnet18", width=4, clients=4, clients_per_round=2, rounds=2,
                   batch_size=BATCH, eval_examples=EVAL_EXAMPLES)
    options.update(flags)
    argv = ["train", "--out", str(out)]
    for name, value in options.items():
        argv += ["--" + name.replace("_", "-"), str(value)]
    return _cli(*argv)


def _read_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _table(stdout: str) -> list[tuple[str, ...]]:
    """The per-round table the CLI prints: header once, then one line per round (returns the rows' fields)."""
    lines = stdout.splitlines()
    headers = [i for i, line in enumerate(lines) if TABLE_HEADER.match(line)]
    assert len(headers) == 1, f"expected one table header on stdout, got {len(headers)}:\n{stdout}"
    return [m.groups() for line in lines[headers[0] + 1:] if (m := TABLE_ROW.match(line))]


def _printed_summary(stdout: str) -> dict:
    """The JSON summary the CLI prints after the table (from a line '{' to the next line '}')."""
    lines = stdout.splitlines()
    start = lines.index("{")
    stop = lines.index("}", start)
    return json.loads("\n".join(lines[start:stop + 1]))


def _assert_finite_rows(rows: list[dict]) -> None:
    for row in rows:
        missing = [k for k in ROW_KEYS if k not in row]
        assert not missing, f"round {row.get('round')}: missing keys {missing}"
        for key in ROW_KEYS:
            value = row[key]
            assert isinstance(value, int | float) and not isinstance(value, bool), (key, value)
            assert math.isfinite(value), f"round {row['round']}: {key} = {value}"
        assert 0.0 <= row["train_accuracy"] <= 1.0
        assert 0.0 <= row["eval_accuracy"] <= 1.0
        assert row["train_loss"] > 0 and row["eval_loss"] > 0
        assert 0.0 < row["kernel_coverage"] <= 1.0
        assert row["round_seconds"] > 0
        for key in ("bytes_down_per_client", "bytes_up_per_client", "full_model_bytes",
                    "client_flops_per_example", "full_flops_per_example"):
            assert row[key] > 0, (key, row[key])


def _assert_table_matches(table: list[tuple[str, ...]], rows: list[dict]) -> None:
    """The printed table shows the same numbers as metrics.jsonl (3 decimals)."""
    assert [int(t[0]) for t in table] == [r["round"] for r in rows]
    for t, r in zip(table, rows, strict=True):
        _, loss, train_acc, test_acc, coverage, down, flops, dropped, sec = t
        assert int(dropped) == r["clients_dropped"]
        assert float(loss) == pytest.approx(r["train_loss"], abs=6e-4)
        assert float(train_acc) == pytest.approx(r["train_accuracy"], abs=6e-4)
        assert float(test_acc) == pytest.approx(r["eval_accuracy"], abs=6e-4)
        assert float(coverage) == pytest.approx(r["kernel_coverage"], abs=6e-4)
        assert float(down) == pytest.approx(r["bytes_down_per_client"] / r["full_model_bytes"], abs=6e-4)
        assert float(flops) == pytest.approx(r["client_flops_per_example"] / r["full_flops_per_example"], abs=6e-4)
        assert float(sec) == pytest.approx(r["round_seconds"], abs=0.06)


def _error_lines(result: Result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def _worker_pids() -> set[int]:
    done = subprocess.run(["pgrep", "-f", "worker_binary"], stdout=subprocess.PIPE, text=True)
    return {int(p) for p in done.stdout.split()}


def _has_env_token(pid: int, token: str) -> bool:
    """Whether process `pid` carries our marker variable (processes inherit it from the CLI we started)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"{TOKEN_VAR}={token}".encode() in f.read().split(b"\0")
    except OSError:  # gone, or not ours to read
        return False


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dataset(shapes_dataset) -> Path:
    return shapes_dataset


class _Jobs:
    """The CLI runs of this module: each runs once, at most `PARALLEL` at a time, started as early as possible.

    A run spends most of its time importing TensorFlow and tracing, under one core on average, so overlapping
    runs shortens the file a lot on two cores. A job becomes ready when the jobs in its `needs` are done (those
    are enqueued first, as soon as they finish, before their slot is released); a free slot goes to the ready
    job earliest in `JOB_ORDER` (the prism run and the resumes of copies of it are the longest chain). Each job
    has its own thread, which holds a slot only while its command runs.
    """

    PARALLEL = 3

    def __init__(self) -> None:
        self.recipes: dict[str, tuple[Callable[[], Any], tuple[str, ...]]] = {}
        self._futures: dict[str, concurrent.futures.Future] = {}
        self._cond = threading.Condition(threading.RLock())
        self._ready: list[tuple[int, str]] = []  # heap of (priority, name)
        self._blocked: dict[str, tuple[str, ...]] = {}  # started jobs waiting for their needs
        self._done: set[str] = set()
        self._running = 0
        self._closed = False

    def add(self, name: str, fn: Callable[[], Any], needs: tuple[str, ...] = ()) -> None:
        self.recipes[name] = (fn, needs)

    def start(self, name: str) -> concurrent.futures.Future:
        with self._cond:
            if name not in self._futures:
                fn, needs = self.recipes[name]
                for dependency in needs:
                    self.start(dependency)
                self._futures[name] = concurrent.futures.Future()
                self._blocked[name] = needs
                self._release_ready()
                threading.Thread(target=self._job, args=(name, fn), name=f"cli-job-{name}", daemon=True).start()
            return self._futures[name]

    def result(self, name: str) -> Any:
        return self.start(name).result()

    def _release_ready(self) -> None:
        for name, needs in list(self._blocked.items()):
            if all(n in self._done for n in needs):
                del self._blocked[name]
                heapq.heappush(self._ready, (JOB_ORDER.index(name) if name in JOB_ORDER else len(JOB_ORDER), name))

    def _job(self, name: str, fn: Callable[[], Any]) -> None:
        future = self._futures[name]
        with self._cond:
            self._cond.wait_for(lambda: self._closed or (
                self._running < self.PARALLEL and bool(self._ready) and self._ready[0][1] == name))
            if self._closed:
                future.set_exception(RuntimeError(f"job {name} not run: the module's tests are over"))
                return
            heapq.heappop(self._ready)
            self._running += 1
            self._cond.notify_all()
        try:
            future.set_result(fn())
        except BaseException as e:  # pytest.fail raises a BaseException; the test reading the job re-raises it
            future.set_exception(e)
        finally:
            with self._cond:
                self._done.add(name)
                self._release_ready()  # dependents queue up before this slot is given away
                self._running -= 1
                self._cond.notify_all()

    def close(self) -> None:
        """Drops jobs not started and kills runs still going (nobody will read them: their tests are over)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        with _live_lock:
            running = list(_live)
        for proc in running:
            _kill_session(proc)
        for future in self._futures.values():
            with contextlib.suppress(BaseException):
                future.exception(timeout=60)


ERROR_CASES = {
    # name: words the single `error: ` line must contain
    "missing_dataset": ("dataset path not found", "no_such_dataset"),
    "keep_ratio": ("--keep-ratio", "1.5"),
    "clients_per_round": ("--clients-per-round", "--clients", "5", "4"),
    "partition": ("partition", "bogus"),
    "resume_empty": ("no run in", "empty_dir", "config.json"),
    "existing_run": ("already holds a run", "existing_run", "--overwrite"),
}

# Which jobs each test reads (to start them all when the module starts); a test not listed still gets its job,
# only later.
QUICK_JOBS = ("help", "missing_dataset", "keep_ratio", "clients_per_round", "partition", "resume_empty",
              "existing_run", "out_is_file", "resume_rounds0")
JOBS_OF_TEST = {
    "test_train_prism_end_to_end": ("prism",),
    "test_train_fedavg_costs_equal_full_model": ("fedavg_piped",),
    "test_piped_run_finishes_and_leaves_no_worker": ("fedavg_piped",),
    "test_resume_continues_from_last_checkpoint": ("resume",),
    "test_resume_drops_metrics_newer_than_checkpoint": ("resume_after_lost_checkpoint",),
    "test_partial_client_datasets_28x28_grayscale": ("partial",),
    "test_bad_input_exits_2_with_one_error_line": tuple(ERROR_CASES),
    "test_rejected_options_create_no_run_dir": ("keep_ratio", "clients_per_round"),
    "test_train_refuses_existing_run_and_leaves_it_intact": ("existing_run",),
    "test_train_help_documents_every_option": ("help",),
    "test_failed_train_leaves_no_run_behind": ("missing_dataset", "partition"),
    "test_out_is_a_file_is_a_clean_error": ("out_is_file",),
    "test_rejected_resume_keeps_config": ("resume_rounds0",),
}
# Priority (and start order): the prism run and the resumes of copies of it first (the longest chain), then
# the other long runs, then the quick ones.
JOB_ORDER = ("prism", "resume", "resume_after_lost_checkpoint", "fedavg_piped", "partial", *QUICK_JOBS)


@pytest.fixture(scope="module")
def jobs(dataset, tmp_path_factory) -> Iterator[_Jobs]:
    base = tmp_path_factory.mktemp("cli")
    env = _env(base / "prism_cache")
    runs = _Jobs()

    def prism() -> tuple[Path, Result]:
        """PriSM, ResNet-18 width 4, keep 0.25, 4 clients (30 images each), 2 per round, 2 rounds."""
        out = base / "prism"
        return out, _run(_train_args(dataset, out, method="prism", keep_ratio=0.25), env, TRAIN_TIMEOUT_S)

    def prism_copy(name: str) -> Path:
        out, result = runs.result("prism")
        assert result.returncode == 0, f"the prism run this test copies failed:\n{result.describe()}"
        return _copy_run(out, base / name)

    def fedavg_piped() -> dict[str, Any]:
        """FedAvg (small CNN) as `bash -c 'set -o pipefail; python -m tff_pipelines train ... | cat'`.

        Also records the worker_binary processes this CLI started that are still alive after it (they carry
        a marker variable in their environment, so runs in parallel with this one do not count).
        """
        out = base / "fedavg"
        command = "set -o pipefail; " + shlex.join(_train_args(dataset, out, method="fedavg", model="small_cnn"))
        before = _worker_pids()
        result = _run(["bash", "-c", command + " | cat"], env, TRAIN_TIMEOUT_S)
        deadline = time.monotonic() + 10  # grace period: a worker stopped at exit may take a moment to go
        while True:
            new = _worker_pids() - before
            ours = {p for p in new if _has_env_token(p, result.token)}
            if not ours or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        return dict(out=out, result=result, surviving_workers=ours, new_worker_pids=new)

    def partial() -> tuple[Path, Result]:
        out = base / "partial"
        args = _train_args(dataset, out, method="fedavg", clients=5, clients_per_round=PARTIAL["per_round"],
                           examples_per_client=PARTIAL["per_client"], local_epochs=PARTIAL["epochs"],
                           rounds=PARTIAL["rounds"], eval_examples=PARTIAL["eval_examples"])
        return out, _run(args, env, TRAIN_TIMEOUT_S)

    def resume() -> tuple[Path, Result]:
        run = prism_copy("resumed")
        return run, _run(_cli("resume", "--out", str(run), "--rounds", "3"), env, TRAIN_TIMEOUT_S)

    def resume_after_lost_checkpoint() -> tuple[Path, Result]:
        run = prism_copy("lost_checkpoint")
        shutil.rmtree(run / "checkpoints" / "program_state_2")  # metrics.jsonl still has round 2
        return run, _run(_cli("resume", "--out", str(run)), env, TRAIN_TIMEOUT_S)

    def quick(argv_fn: Callable[[], list[str]], out: Path) -> Callable[[], tuple[Result, Path]]:
        return lambda: (_run(argv_fn(), env, QUICK_TIMEOUT_S), out)

    def existing_run_args() -> list[str]:
        return _train_args(dataset, prism_copy("existing_run"))

    def resume_rounds0_args() -> list[str]:
        return _cli("resume", "--out", str(prism_copy("resume_rounds0")), "--rounds", "0")

    def resume_empty_args() -> list[str]:
        (base / "empty_dir").mkdir()
        return _cli("resume", "--out", str(base / "empty_dir"))

    def out_is_file_args() -> list[str]:
        (base / "a_file").write_text("not a directory\n")
        return _train_args(dataset, base / "a_file")

    runs.add("prism", prism)
    runs.add("fedavg_piped", fedavg_piped)
    runs.add("partial", partial)
    runs.add("resume", resume, needs=("prism",))
    runs.add("resume_after_lost_checkpoint", resume_after_lost_checkpoint, needs=("prism",))
    quick_jobs = {
        "help": (lambda: _cli("train", "--help"), base / "unused"),
        "missing_dataset": (lambda: _train_args(base / "no_such_dataset", base / "r_missing"), base / "r_missing"),
        "keep_ratio": (lambda: _train_args(dataset, base / "r_keep", keep_ratio=1.5), base / "r_keep"),
        "clients_per_round": (lambda: _train_args(dataset, base / "r_cpr", clients=4, clients_per_round=5),
                              base / "r_cpr"),
        "partition": (lambda: _train_args(dataset, base / "r_part", partition="bogus"), base / "r_part"),
        "resume_empty": (resume_empty_args, base / "empty_dir"),
        "existing_run": (existing_run_args, base / "existing_run"),
        "out_is_file": (out_is_file_args, base / "a_file"),
        "resume_rounds0": (resume_rounds0_args, base / "resume_rounds0"),
    }
    assert set(quick_jobs) == set(QUICK_JOBS)
    for name, (argv_fn, out) in quick_jobs.items():
        needs = ("prism",) if name in ("existing_run", "resume_rounds0") else ()
        runs.add(name, quick(argv_fn, out), needs=needs)
    yield runs
    runs.close()


@pytest.fixture(scope="module", autouse=True)
def _start_jobs_early(request, jobs) -> None:
    """Starts, in `JOB_ORDER`, every job a selected test of this module will read."""
    wanted = {job for item in request.session.items if item.module is request.module
              for job in JOBS_OF_TEST.get(getattr(item, "originalname", item.name), ())}
    for name in JOB_ORDER:
        if name in wanted:
            jobs.start(name)


@pytest.fixture
def prism_run(jobs) -> tuple[Path, Result]:
    out, result = jobs.result("prism")
    assert result.returncode == 0, result.describe()
    return out, result


@pytest.fixture
def fedavg_piped(jobs) -> dict[str, Any]:
    return jobs.result("fedavg_piped")


# --------------------------------------------------------------------------------------------- 1. train (prism)


def test_train_prism_end_to_end(prism_run):
    out, result = prism_run
    rows = _read_rows(out)
    assert [r["round"] for r in rows] == [1, 2]
    _assert_finite_rows(rows)

    # The per-round table on stdout shows the same numbers.
    _assert_table_matches(_table(result.stdout), rows)

    for r in rows:
        # 4 clients x 40 images (iid: 30 each); 2 per round; 2 local epochs (the default) of 30, batches of 8,
        # the partial one dropped: 2 x 56.
        assert r["clients"] == 2
        assert r["num_examples"] == 2 * (2 * 30 // BATCH) * BATCH
        # Accuracy on 12 test images is a multiple of 1/12.
        assert r["eval_accuracy"] * EVAL_EXAMPLES == pytest.approx(round(r["eval_accuracy"] * EVAL_EXAMPLES))
        # Sub-models at keep 0.25 cost less than the full model, both ways and in flops.
        assert r["bytes_down_per_client"] / r["full_model_bytes"] < 1
        assert r["bytes_up_per_client"] / r["full_model_bytes"] < 1
        assert r["client_flops_per_example"] / r["full_flops_per_example"] < 1
        assert r["kernel_coverage"] < 1  # 2 clients at 25 % each cannot cover every kernel of every layer
    assert rows[0]["full_model_bytes"] == rows[1]["full_model_bytes"]
    assert rows[0]["full_flops_per_example"] == rows[1]["full_flops_per_example"]

    summary = json.loads((out / "summary.json").read_text())
    assert summary == _printed_summary(result.stdout)
    assert summary["method"] == "prism" and summary["rounds"] == 2 and summary["model_width"] == 4
    assert summary["final_accuracy"] == pytest.approx(rows[-1]["eval_accuracy"])
    assert summary["best_accuracy"] == pytest.approx(max(r["eval_accuracy"] for r in rows))
    last = rows[-1]
    assert summary["bytes_down_ratio"] == pytest.approx(last["bytes_down_per_client"] / last["full_model_bytes"])
    assert summary["flops_ratio"] == pytest.approx(last["client_flops_per_example"] / last["full_flops_per_example"])
    assert 0 < summary["bytes_down_ratio"] < 1 and 0 < summary["flops_ratio"] < 1

    config = json.loads((out / "config.json").read_text())
    assert {f.name for f in dataclasses.fields(driver.TrainConfig)} | {"format_version"} == set(config)
    assert config["format_version"] == 1
    assert config["method"] == "prism" and config["model"] == "resnet18" and config["width"] == 4
    assert config["keep_ratio"] == 0.25 and config["rounds"] == 2 and config["batch_size"] == BATCH
    assert config["dataset"].endswith("shapes")

    assert (out / "accuracy.png").read_bytes()[:8] == PNG_SIGNATURE
    assert (out / "checkpoints" / "program_state_2").is_dir()
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------------------------- 2. fedavg


def test_train_fedavg_costs_equal_full_model(fedavg_piped):
    result, out = fedavg_piped["result"], fedavg_piped["out"]
    assert result.returncode == 0, result.describe()
    rows = _read_rows(out)
    assert [r["round"] for r in rows] == [1, 2]
    _assert_finite_rows(rows)
    _assert_table_matches(_table(result.stdout), rows)
    for r in rows:
        assert r["bytes_down_per_client"] / r["full_model_bytes"] == pytest.approx(1.0, abs=1e-6)
        # Up: the whole model plus a few float32 metric scalars (layout.bytes_up: 3 of them).
        assert 0 <= r["bytes_up_per_client"] - r["full_model_bytes"] <= 4 * 8
        assert r["client_flops_per_example"] / r["full_flops_per_example"] == pytest.approx(1.0, abs=1e-6)
        assert r["kernel_coverage"] == pytest.approx(1.0)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "fedavg"
    assert summary["bytes_down_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert summary["flops_ratio"] == pytest.approx(1.0, abs=1e-6)


# --------------------------------------------------------------------------------------------- 3. resume


@pytest.mark.slow  # a CLI resume; test_resume_drops_metrics_newer_than_checkpoint resumes in the default suite
def test_resume_continues_from_last_checkpoint(jobs, prism_run):
    original = _read_rows(prism_run[0])
    run, result = jobs.result("resume")  # a copy of the prism run (2 rounds), resumed with --rounds 3
    assert result.returncode == 0, result.describe()
    assert f"resuming {run} after round 2 of 3" in result.stdout

    rows = _read_rows(run)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[:2] == original  # rounds 1-2 kept as they were, round 3 appended
    _assert_finite_rows(rows)
    # Only round 3 was trained (and printed) by this invocation.
    _assert_table_matches(_table(result.stdout), rows[2:])
    assert rows[2]["num_examples"] == original[1]["num_examples"]
    assert rows[2]["bytes_down_per_client"] / rows[2]["full_model_bytes"] < 1

    assert json.loads((run / "config.json").read_text())["rounds"] == 3
    summary = json.loads((run / "summary.json").read_text())
    assert summary == _printed_summary(result.stdout)
    assert summary["rounds"] == 3
    assert summary["final_accuracy"] == pytest.approx(rows[2]["eval_accuracy"])
    assert summary["best_accuracy"] == pytest.approx(max(r["eval_accuracy"] for r in rows))
    assert (run / "checkpoints" / "program_state_3").is_dir()
    assert (run / "accuracy.png").read_bytes()[:8] == PNG_SIGNATURE


def test_resume_drops_metrics_newer_than_checkpoint(jobs, prism_run):
    """metrics.jsonl has round 2 but the newest checkpoint is round 1 (round 2's was lost): resume redoes 2."""
    original = _read_rows(prism_run[0])
    run, result = jobs.result("resume_after_lost_checkpoint")
    assert result.returncode == 0, result.describe()
    assert f"resuming {run} after round 1 of 2" in result.stdout

    rows = _read_rows(run)
    assert [r["round"] for r in rows] == [1, 2]  # the stale round-2 row was dropped, not kept beside the new one
    assert rows[0] == original[0]
    _assert_finite_rows(rows)
    _assert_table_matches(_table(result.stdout), rows[1:])
    assert (run / "checkpoints" / "program_state_2").is_dir()
    assert json.loads((run / "summary.json").read_text())["rounds"] == 2
    # Round 2 again from round 1's checkpoint, with the same clients and seeds: the same round as before (the
    # checkpoint holds the whole state). Tolerances allow for a different float summation order.
    redone, before = rows[1], original[1]
    assert redone["num_examples"] == before["num_examples"]
    for key in ("train_loss", "train_accuracy", "kernel_coverage", "eval_loss", "eval_accuracy"):
        assert redone[key] == pytest.approx(before[key], rel=1e-3, abs=1e-5), key


# --------------------------------------------------------------------------------------------- 4. partial batches


def test_partial_client_datasets_28x28_grayscale(jobs):
    """Regression (docs/pitfalls.md, "oneDNN and batch shapes"): TF 2.14's oneDNN kernels corrupt memory when the
    batch size varies on 28x28x1.

    FedAvg on ResNet-18 width 4; 5 clients x 21 examples (24 each, capped), 2 local epochs: 42 examples = 5 full
    batches of 8 + 2 left over per client and round. The CLI must keep batch shapes fixed (it drops the partial
    batch) and train cleanly.
    """
    out, result = jobs.result("partial")
    p = PARTIAL
    assert p["per_client"] % BATCH and (p["per_client"] * p["epochs"]) % BATCH
    for symptom in ("double free", "corrupted", "malloc(): "):
        assert symptom not in result.stderr, result.describe()
    assert result.returncode == 0, result.describe()
    rows = _read_rows(out)
    assert [r["round"] for r in rows] == list(range(1, p["rounds"] + 1))
    _assert_finite_rows(rows)
    for r in rows:
        assert r["clients"] == p["per_round"]
        assert r["num_examples"] == p["per_round"] * (p["per_client"] * p["epochs"] // BATCH) * BATCH  # 3 x 40
        n = p["eval_examples"]
        assert r["eval_accuracy"] * n == pytest.approx(round(r["eval_accuracy"] * n))


# --------------------------------------------------------------------------------------------- 5. errors
# (the cases and the words their error line must contain: ERROR_CASES, above)


@pytest.mark.parametrize("name", list(ERROR_CASES))
def test_bad_input_exits_2_with_one_error_line(jobs, name):
    result, _ = jobs.result(name)
    assert result.returncode == 2, result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    errors = _error_lines(result)
    assert len(errors) == 1, result.describe()
    for word in ERROR_CASES[name]:
        assert word in errors[0], f"{word!r} not in {errors[0]!r}"
    assert "results:" not in result.stdout  # nothing reported as a finished run


@pytest.mark.parametrize("name", ["keep_ratio", "clients_per_round"])
def test_rejected_options_create_no_run_dir(jobs, name):
    result, out = jobs.result(name)
    assert result.returncode == 2
    assert not out.exists()


def test_train_refuses_existing_run_and_leaves_it_intact(jobs, prism_run):
    result, existing = jobs.result("existing_run")
    assert result.returncode == 2
    assert _read_rows(existing) == _read_rows(prism_run[0])
    assert (existing / "config.json").read_text() == (prism_run[0] / "config.json").read_text()
    assert (existing / "checkpoints" / "program_state_2").is_dir()


# --------------------------------------------------------------------------------------------- 6. help


def test_train_help_documents_every_option(jobs):
    result, _ = jobs.result("help")
    assert result.returncode == 0, result.describe()
    text = result.stdout
    flags = ["--" + f.name.replace("_", "-") for f in dataclasses.fields(driver.TrainConfig)] + ["--out"]
    for flag in flags:
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), f"{flag} missing from train --help"
    # Each option entry carries a description, not just its metavar.
    options = text[text.index("options:"):]
    entries = re.split(r"\n(?=  -)", options)
    described = {}
    for entry in entries[1:]:
        words = entry.split()
        i = next(k for k, w in enumerate(words) if w.startswith("--"))
        rest = words[i + 1:]
        if rest and rest[0].isupper():  # the metavar
            rest = rest[1:]
        described[words[i].rstrip(",")] = bool(rest)
    undocumented = [f for f in flags if not described.get(f)]
    assert not undocumented, f"options without a description in train --help: {undocumented}"


# --------------------------------------------------------------------------------------------- 7. pipes, workers


def test_piped_run_finishes_and_leaves_no_worker(fedavg_piped):
    result = fedavg_piped["result"]
    # `_run` fails the test on timeout: reaching here means `... | cat` finished (no orphan held the pipe).
    assert result.returncode == 0, result.describe()
    assert result.seconds < TRAIN_TIMEOUT_S
    # The table and the closing line went through cat.
    assert len(_table(result.stdout)) == 2
    assert "results:" in result.stdout
    assert not fedavg_piped["surviving_workers"], (
        f"worker_binary processes started by the CLI survived it: {sorted(fedavg_piped['surviving_workers'])} "
        f"(all new worker_binary pids: {sorted(fedavg_piped['new_worker_pids'])})")


# ------------------------------------------------------------------------ regressions (bugs these tests found)


@pytest.mark.parametrize("name", ["missing_dataset", "partition"])
def test_failed_train_leaves_no_run_behind(jobs, name):
    result, out = jobs.result(name)
    assert result.returncode == 2
    assert not (out / "config.json").exists()


def test_out_is_a_file_is_a_clean_error(jobs):
    result, _ = jobs.result("out_is_file")
    assert "Traceback" not in result.stderr, result.describe()
    assert result.returncode == 2
    assert len(_error_lines(result)) == 1


def test_rejected_resume_keeps_config(jobs, prism_run):
    result, run = jobs.result("resume_rounds0")
    assert result.returncode == 2, result.describe()
    assert "Traceback" not in result.stderr
    assert len(_error_lines(result)) == 1 and "--rounds" in _error_lines(result)[0]
    assert json.loads((run / "config.json").read_text())["rounds"] == 2
