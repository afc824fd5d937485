"""The round server over real HTTP on loopback: `python -m export serve` in a subprocess, devices as clients.

The run is written without TFF or training (config, data spec, budget; round 1 open, as tests/test_ingest.py).
- phones: devices in a subprocess without TensorFlow (`export.serve.phone`: urllib, numpy, LiteRT) fetch their
  files and train in LiteRT concurrently; the round the server finishes equals the same updates ingested one by
  one from files (`export ingest`, `export finish-round`) on a copy of the run, bit for bit;
- bad requests (over HTTPS with a self-signed certificate): every refusal a status and one line, with the run
  directory byte-identical; a repeated upload is idempotent, a second different one and one after the round closed
  are refused (409) and do not enter the next round;
- kill -9 mid-round and a restart keep the accepted uploads, the open round and its deadline; the deadline closes
  the round with the stragglers left out, which are then refused;
- ``--fill simulated``: two rounds closed at a quorum of 2 of their 3 clients, the third simulated by TFF (``resume
  --until-round N`` in a subprocess), equal bit for bit to a run given the same device updates and ``resume``d to
  the end; a simulation that fails leaves the round open with its updates, and says why in one line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest

from export import ingest as ingest_lib
from export.serve.credentials import authenticate, enrol, hash_token
from prism_tf.federated.config import TrainConfig, client_budget, round_clients, stored_config
from prism_tf.federated.replay import RoundReplay
from prism_tf.federated.rundir import RunDir, RunError

REPO_ROOT = Path(__file__).resolve().parents[1]
SHAPE, CLASSES = (8, 8, 1), 3


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def make_run(out: Path, clients: int, per_round: int, shape: tuple[int, ...] = SHAPE,
             **options) -> tuple[Path, dict[int, str]]:
    """A PriSM small-CNN run with round 1 open and every client enrolled; the credentials by client. ``options``:
    other `TrainConfig` fields (a ``dataset`` of ``shape`` inputs for runs whose rounds TFF simulates)."""
    config = TrainConfig(**{**dict(model="small_cnn", width=4, clients=clients, clients_per_round=per_round,
                                   rounds=3, batch_size=8, keep_ratio=0.5, seed=5), **options})
    run = RunDir(out)
    run.write_config(dataclasses.asdict(config), overwrite=False)
    run.write_data_spec(shape, CLASSES)
    run.write_budget(client_budget(config, shape, CLASSES)[2])
    run.run_id()
    tokens = {}
    for c in range(clients):
        issued = enrol(out, f"phone-{c}")
        tokens[issued.device.client] = issued.token
    return out, tokens


class Server:
    """``python -m export serve`` in a subprocess; ``url`` once it listens."""

    def __init__(self, run: Path, log: Path, *args: str) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "export", "serve", "--run", str(run), "--port", "0", *args], cwd=REPO_ROOT,
            stdout=subprocess.PIPE, stderr=open(log, "ab"), text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        line = self.proc.stdout.readline()
        assert line.startswith("listening on "), (line, log.read_text()[-3000:])
        self.url = line.split()[2]

    def client(self, token: str | None = None, **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **kwargs)

    def wait_for(self, token: str, predicate, timeout: float = 120, **kwargs) -> dict:
        """Poll ``GET /v1/round`` until ``predicate(status)``."""
        end = time.monotonic() + timeout
        with self.client(token, **kwargs) as http:
            while True:
                assert self.proc.poll() is None, self.log.read_text()[-3000:]
                status = http.get("/v1/round").json()
                if predicate(status):
                    return status
                assert time.monotonic() < end, (status, self.log.read_text()[-3000:])
                time.sleep(0.3)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)


def phones(url: str, tokens: list[str], data: Path, tmp: Path, *extra: str) -> list[dict]:
    """Devices in one subprocess without TensorFlow, each playing the round in its own thread."""
    tmp.mkdir(parents=True, exist_ok=True)
    credentials = tmp / "credentials.json"
    credentials.write_text(json.dumps(tokens))
    proc = subprocess.run(
        [sys.executable, "-m", "export.serve.phone", "--server", url, "--credentials", str(credentials), "--data",
         str(data), "--cache", str(tmp / "cache"), "--out", str(tmp / "trained"), *extra], cwd=REPO_ROOT,
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.strip().splitlines()]


def batches(path: Path, steps: int = 2) -> Path:
    rng = np.random.default_rng(3)
    np.savez(path, x=rng.normal(size=(steps, 8, *SHAPE)).astype(np.float32),
             y=rng.integers(0, CLASSES, (steps, 8)).astype(np.int32))
    return path


def ingest_one_by_one(reference: Path, reports: list[dict], tmp: Path) -> None:
    """The same updates through the file path: `export ingest` of each, then `export finish-round`."""
    for i, report in enumerate(sorted(reports, key=lambda r: r["client"])):
        client_dir = tmp / f"client_dir_{report['client']}"
        client_dir.mkdir()
        manifest = next(p for p in (tmp / "cache").rglob("manifest.json")
                        if json.loads(p.read_text())["client"] == report["client"])
        shutil.copy(manifest, client_dir / "manifest.json")
        ingest_lib.ingest(reference, client_dir, tmp / "trained" / f"trained_{report['client']}.npz",
                          examples=report["examples"])
        assert i + 1 == len(RunDir(reference).read_device_updates(1))
    ingest_lib.finish_round(reference)


def assert_same_round(served: Path, reference: Path, round_num: int = 1) -> None:
    a, b = RunDir(served).read_checkpoint(round_num)[0], RunDir(reference).read_checkpoint(round_num)[0]
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y)
    row_a, row_b = RunDir(served).read_metrics()[-1], RunDir(reference).read_metrics()[-1]
    assert row_a.pop("finished_by") == "export serve" and row_b.pop("finished_by") == "export finish-round"
    assert row_a == row_b


def _round_of_phones(tmp_path: Path, clients: int, per_round: int) -> None:
    run, tokens = make_run(tmp_path / "run", clients, per_round)
    reference = Path(shutil.copytree(run, tmp_path / "reference"))
    drawn = RoundReplay(run).clients()
    server = Server(run, tmp_path / "server.log", "--rounds", "1")
    try:
        began = time.perf_counter()
        reports = phones(server.url, [tokens[c] for c in range(clients)], batches(tmp_path / "batches.npz"),
                         tmp_path)
        assert server.proc.wait(300) == 0, server.log.read_text()[-3000:]  # --rounds 1: it stops after closing
        print(f"{per_round} phones: {time.perf_counter() - began:.1f} s from the first request to the round closed")
    finally:
        server.stop()
    played = [r for r in reports if r["assigned"]]
    assert sorted(r["client"] for r in played) == sorted(drawn)
    assert all(r["status"] == 201 and r["tensorflow"] is False and np.isfinite(r["losses"]).all() for r in played)
    assert all(r["reason"].startswith("round 1 did not draw") for r in reports if not r["assigned"])
    models = {p.resolve().name for p in (tmp_path / "cache").glob("device_*/round_1/model.tflite")}
    assert len(models) == 1  # one model.tflite for every phone (one graph), content-addressed
    ingest_one_by_one(reference, played, tmp_path)
    assert_same_round(run, reference)


@pytest.mark.slow  # ~20 s; test_fifty_concurrent_phones is the same check at 50 phones (make test-all)
def test_a_round_of_concurrent_phones_equals_one_by_one_ingest(tmp_path):
    _round_of_phones(tmp_path, clients=10, per_round=8)


@pytest.mark.slow
def test_fifty_concurrent_phones(tmp_path):
    _round_of_phones(tmp_path, clients=56, per_round=50)


def _certificate(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out",
                    str(cert)], check=True, capture_output=True)
    return cert, key


def _upload(weights: dict[str, np.ndarray], shift: float = 0.0, **changes) -> bytes:
    arrays = {k: (v + np.asarray(shift, v.dtype)).astype(v.dtype) for k, v in weights.items()}
    for name, value in changes.items():
        if value is None:
            arrays.pop(name)
        else:
            arrays[name] = value
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _bomb(name: str) -> bytes:
    """A small .npz whose array header claims 4 GB: refused before anything is allocated."""
    npy = io.BytesIO()
    np.lib.format.write_array_header_1_0(npy, {"descr": "<f4", "fortran_order": False, "shape": (10**9,)})
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(f"{name}.npy", npy.getvalue() + b"\0" * 64)
    return buffer.getvalue()


def test_bad_requests_are_refused_over_tls_and_change_nothing(tmp_path):
    run, tokens = make_run(tmp_path / "run", clients=6, per_round=3)
    drawn = RoundReplay(run).clients()
    idle = next(c for c in range(6) if c not in drawn)
    me, other, third = drawn
    cert, key = _certificate(tmp_path)
    server = Server(run, tmp_path / "server.log", "--tls-cert", str(cert), "--tls-key", str(key), "--min-updates",
                    "2")
    try:
        server.wait_for(tokens[me], lambda s: s["state"] == "open", verify=str(cert))
        with server.client(tokens[me], verify=str(cert)) as http:
            assignment = http.get("/v1/assignment").json()
            files = {name: http.get(d["url"]).content for name, d in assignment["files"].items()}
            assert {n: hashlib.sha256(b).hexdigest() for n, b in files.items()} == {
                n: d["sha256"] for n, d in assignment["files"].items()}
            again = http.get(assignment["files"]["model.tflite"]["url"],
                             headers={"If-None-Match": f'"{assignment["files"]["model.tflite"]["sha256"]}"'})
            assert again.status_code == 304 and "immutable" in again.headers["cache-control"]
            schema = http.get("/openapi.json").json()
        assert {"/v1/round", "/v1/assignment", "/v1/files/{sha256}",
                "/v1/rounds/{round_num}/clients/{client}/update"} <= set(schema["paths"])
        with np.load(io.BytesIO(files["weights.npz"])) as data:
            weights = {k: data[k] for k in data.files}
        first = next(iter(weights))
        url = assignment["upload"]["url"]
        good = _upload(weights, 0.01)
        other_file = None
        with server.client(tokens[other], verify=str(cert)) as http:
            other_file = http.get("/v1/assignment").json()["files"]["weights.npz"]["url"]
        with pytest.raises(httpx.TransportError):  # no plain HTTP on the TLS port
            httpx.get(server.url.replace("https", "http") + "/healthz", timeout=5)

        def call(method, path, token=tokens[me], **kwargs):
            with server.client(token, verify=str(cert)) as http:
                return http.request(method, path, **kwargs)

        bad = {
            "no credential": (401, lambda: call("PUT", url + "?examples=8", token=None, content=good)),
            "unknown credential": (401, lambda: call("PUT", url + "?examples=8", token="x" * 43, content=good)),
            "assignment without credential": (401, lambda: call("GET", "/v1/assignment", token=None)),
            "another client's slot": (403, lambda: call("PUT", url + "?examples=8", token=tokens[other],
                                                        content=good)),
            "a client the round did not draw": (403, lambda: call("PUT", f"/v1/rounds/1/clients/{idle}/update"
                                                                  "?examples=8", token=tokens[idle], content=good)),
            "another client's file": (404, lambda: call("GET", other_file)),
            "a finished round": (409, lambda: call("PUT", f"/v1/rounds/0/clients/{me}/update?examples=8",
                                                   content=good)),
            "a future round": (409, lambda: call("PUT", f"/v1/rounds/2/clients/{me}/update?examples=8",
                                                 content=good)),
            "oversized": (413, lambda: call("PUT", url + "?examples=8", content=good + b"\0" * 70_000)),
            "oversized, chunked": (413, lambda: call("PUT", url + "?examples=8",
                                                     content=iter([good, b"\0" * 70_000]))),
            "not an npz": (422, lambda: call("PUT", url + "?examples=8", content=b"PK\3\4 tampered")),
            "a flipped byte": (422, lambda: call("PUT", url + "?examples=8",
                                                 content=good[:200] + bytes([good[200] ^ 0xFF]) + good[201:])),
            "a pickle": (422, lambda: call("PUT", url + "?examples=8", content=_upload(
                weights, 0.01, extra=np.array([{"a": 1}], dtype=object)))),
            "a wrong shape": (422, lambda: call("PUT", url + "?examples=8", content=_upload(
                weights, 0.01, **{first: weights[first].reshape(-1)}))),
            "a missing weight": (422, lambda: call("PUT", url + "?examples=8", content=_upload(
                weights, 0.01, **{first: None}))),
            "NaN": (422, lambda: call("PUT", url + "?examples=8", content=_upload(
                weights, 0.01, **{first: np.full_like(weights[first], np.nan)}))),
            "a header claiming a huge array": (422, lambda: call("PUT", url + "?examples=8", content=_bomb(first))),
            "no example count": (422, lambda: call("PUT", url, content=good)),
            "a negative example count": (422, lambda: call("PUT", url + "?examples=-3", content=good)),
            "examples not a number": (422, lambda: call("PUT", url + "?examples=many", content=good)),
        }
        before = _tree(run)
        for name, (status, request) in bad.items():
            response = request()
            detail = response.json()["detail"]
            assert response.status_code == status, (name, response.status_code, detail)
            assert isinstance(detail, str) and detail and "\n" not in detail, (name, detail)
            assert _tree(run) == before, name
        print("\n".join(f"{name}: {request().json()['detail']}" for name, (_, request) in bad.items()))

        accepted = call("PUT", url + "?examples=8", content=good)
        assert accepted.status_code == 201 and accepted.json()["repeat"] is False
        stored = _tree(run)
        assert stored != before
        repeat = call("PUT", url + "?examples=8", content=good)  # a retry after a lost answer: idempotent
        assert repeat.status_code == 200 and repeat.json()["repeat"] is True
        replaced = call("PUT", url + "?examples=8", content=_upload(weights, 0.02))
        assert replaced.status_code == 409 and "stored already" in replaced.json()["detail"]
        assert _tree(run) == stored

        # The quorum (2) closes round 1; an upload to it afterwards is refused and not in round 2.
        with server.client(tokens[other], verify=str(cert)) as http:
            a = http.get("/v1/assignment").json()
            w = http.get(a["files"]["weights.npz"]["url"]).content
            with np.load(io.BytesIO(w)) as data:
                second = _upload({k: data[k] for k in data.files}, -0.01)
            assert http.put(a["upload"]["url"] + "?examples=5", content=second).status_code == 201
        server.wait_for(tokens[me], lambda s: s["round"] == 2, verify=str(cert))
        late = call("PUT", f"/v1/rounds/1/clients/{third}/update?examples=8", token=tokens[third], content=good)
        assert late.status_code == 409 and "round 1 is closed" in late.json()["detail"]
        assert not RunDir(run).read_device_updates(2)
        assert not RunDir(run).serve_round_dir(1).exists() and RunDir(run).read_serve_round(2) is not None
        row = RunDir(run).read_metrics()[-1]
        assert (row["round"], row["device_clients"], row["finished_by"]) == (1, sorted([me, other]), "export serve")
    finally:
        server.stop()
    with pytest.raises(ValueError, match="round 1 of .* is finished"):  # a device would train it for nothing
        from export.client import export_client

        export_client(run, me, tmp_path / "late_export", round_num=1)
    assert not (tmp_path / "late_export").exists()


@pytest.mark.slow  # ~75 s: two server starts and a deadline (make test-all)
def test_kill_9_keeps_every_accepted_upload_and_the_deadline_closes_a_round_with_stragglers(tmp_path):
    run, tokens = make_run(tmp_path / "run", clients=6, per_round=4)
    reference = Path(shutil.copytree(run, tmp_path / "reference"))
    drawn = RoundReplay(run).clients()
    straggler = drawn[3]
    data = batches(tmp_path / "batches.npz")
    server = Server(run, tmp_path / "server.log", "--round-timeout", "45")
    try:
        reports = phones(server.url, [tokens[c] for c in drawn[:3]], data, tmp_path)
        assert [r["status"] for r in reports] == [201, 201, 201]
        deadline = server.wait_for(tokens[drawn[0]], lambda s: s["updates"] == 3)["deadline"]
        server.proc.send_signal(signal.SIGKILL)  # no shutdown of any kind
        server.proc.wait(30)
        kept = {k: v for k, v in _tree(run).items() if k.startswith("device_updates")}  # the accepted uploads
        assert sorted(u.client for u in RunDir(run).read_device_updates(1)) == sorted(drawn[:3])
        # Restarted with another timeout: the round, its uploads and its deadline (from when it opened) hold (on a
        # busy machine the deadline may have passed during the restart: the round is then closed at once).
        server = Server(run, tmp_path / "server2.log", "--round-timeout", "600")
        status = server.wait_for(tokens[drawn[0]], lambda s: s["state"] == "open" or s["round"] == 2)
        assert status["round"] == 2 or (status["updates"], status["deadline"]) == (3, deadline)
        assert {k: v for k, v in _tree(run).items() if k in kept} == kept
        if status["round"] == 1:
            again = phones(server.url, [tokens[drawn[0]]], data, tmp_path / "again")
            assert again[0]["assigned"] is False and again[0]["reason"] == "its update is stored"
        # The deadline closes the round with the three updates it has; the straggler is refused after it.
        server.wait_for(tokens[drawn[0]], lambda s: s["round"] == 2, timeout=120)
        with server.client(tokens[straggler]) as http:
            assert http.get("/v1/assignment").json()["round"] == 2
            response = http.put(f"/v1/rounds/1/clients/{straggler}/update?examples=8", content=b"PK")
        assert response.status_code == 409 and response.json()["detail"] == "round 1 is closed; the open round is 2"
    finally:
        server.stop()
    assert RunDir(run).read_metrics()[-1]["device_clients"] == sorted(drawn[:3])
    assert not RunDir(run).read_device_updates(2)
    ingest_one_by_one(reference, reports, tmp_path)
    assert_same_round(run, reference)


def test_enrol_stores_only_a_hash_and_one_device_per_client(tmp_path):
    run, tokens = make_run(tmp_path / "run", clients=3, per_round=2)
    stored = (run / "devices.json").read_text()
    assert all(token not in stored for token in tokens.values())
    devices = RunDir(run).read_devices()
    assert {d["client"] for d in devices.values()} == {0, 1, 2}
    assert devices["phone-1"]["token_sha256"] == hash_token(tokens[1])
    assert authenticate(devices, tokens[2]).name == "phone-2" and authenticate(devices, tokens[2] + "x") is None
    with pytest.raises(RunError, match="every one of the run's 3 clients has a device"):
        enrol(run, "phone-9")
    with pytest.raises(RunError, match="client 1 belongs to device phone-1"):
        enrol(run, "phone-9", 1)
    with pytest.raises(RunError, match="enrolled already"):
        enrol(run, "phone-1")
    with pytest.raises(RunError, match="device name"):
        enrol(run, "../x", 0)
    renewed = enrol(run, "phone-1", replace=True)
    devices = RunDir(run).read_devices()
    assert renewed.device.client == 1 and authenticate(devices, tokens[1]) is None
    assert authenticate(devices, renewed.token).name == "phone-1"


def test_plain_http_is_refused_off_loopback(tmp_path):
    from export.serve.app import is_loopback, serve

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1")
    with pytest.raises(ValueError, match="--host 0.0.0.0 is reachable from other machines"):
        serve(None, host="0.0.0.0", port=0)  # refused before the server is touched
    with pytest.raises(ValueError, match="both --tls-cert and --tls-key"):
        serve(None, tls_cert="cert.pem")


# --------------------------------------------------------------------------------------- --fill simulated


def device_upload(server: Server, token: str, shift: float) -> dict:
    """A device without training: its assigned weights, shifted by ``shift``, uploaded with 8 examples."""
    with server.client(token) as http:
        assignment = http.get("/v1/assignment").json()
        assert assignment["assigned"], assignment
        with np.load(io.BytesIO(http.get(assignment["files"]["weights.npz"]["url"]).content)) as data:
            weights = {k: data[k] for k in data.files}
        response = http.put(assignment["upload"]["url"] + "?examples=8", content=_upload(weights, shift))
    assert response.status_code == 201, response.text
    return response.json()


def test_a_failed_fill_keeps_the_round_open_with_its_updates_and_says_why_in_one_line(tmp_path):
    """The simulation cannot load the run's dataset: the round stays open, the upload stays stored, `/v1/round` and
    the log give the driver's own error in one line, and the round takes further uploads."""
    run, tokens = make_run(tmp_path / "run", clients=4, per_round=3, dataset=str(tmp_path / "no_such_dataset"))
    first, second, _ = RoundReplay(run).clients()
    server = Server(run, tmp_path / "server.log", "--fill", "simulated", "--min-updates", "1")
    try:
        server.wait_for(tokens[first], lambda s: s["state"] == "open")
        device_upload(server, tokens[first], 0.01)
        status = server.wait_for(tokens[first], lambda s: "close_error" in s, timeout=240)
        reason = status["close_error"]
        print(reason)
        assert (status["round"], status["state"], status["updates"], status["fill"]) == (1, "open", 1, "simulated")
        assert reason.startswith("simulating round 1's missing clients (python -m tff_pipelines resume "
                                 "--until-round 1) exited with code 2: error: dataset path not found: "), reason
        assert "no_such_dataset" in reason and "\n" not in reason and "Traceback" not in reason
        assert status["retry_at"] > time.time()
        assert [u.client for u in RunDir(run).read_device_updates(1)] == [first]
        assert not RunDir(run).has_checkpoints() and not RunDir(run).read_metrics()
        assert RunDir(run).read_serve_simulation(1) is None  # the record of the running simulation is gone
        assert "error: dataset path not found" in RunDir(run).serve_log_path(1).read_text()
        device_upload(server, tokens[second], 0.02)  # the round is open: it takes more uploads
        assert server.wait_for(tokens[first], lambda s: s["updates"] == 2)["round"] == 1
    finally:
        server.stop()
    log = server.log.read_text()
    assert f"round 1 could not be finished: {reason}; it stays open, closing is tried again in 30 s" in log, log


@pytest.mark.slow  # ~3 min on 2 busy cores: two TFF rounds in subprocesses and a 3-round resume
def test_fill_simulated_equals_a_resume_with_the_same_device_updates(shapes_dataset, tmp_path):
    """Two rounds of a 3-round run, each closed at 2 of its 3 clients' uploads with the third simulated in TFF,
    against a copy of the run given the same uploads and resumed to the end (`python -m tff_pipelines resume`):
    checkpoints 1 and 2 bit for bit and their metrics rows but the wall-clock ``round_seconds`` (TFF's rounds are
    deterministic, tests/test_reliability.py). Round 2 trains under the cosine learning rate over the run's 3
    rounds (stopping after a round does not shorten the schedule)."""
    run, tokens = make_run(tmp_path / "run", clients=4, per_round=3, shape=(28, 28, 1), dataset=str(shapes_dataset),
                           eval_examples=12, eval_every=1, calibration_examples=16)
    reference = Path(shutil.copytree(run, tmp_path / "reference"))
    config = stored_config(RunDir(run))
    drawn = {n: round_clients(config, n - 1) for n in (1, 2)}
    server = Server(run, tmp_path / "server.log", "--fill", "simulated", "--min-updates", "2", "--rounds", "2")
    try:
        for n in (1, 2):
            server.wait_for(tokens[drawn[n][0]], lambda s, n=n: (s["round"], s["state"]) == (n, "open"), timeout=300)
            for i, client in enumerate(drawn[n][:2]):
                device_upload(server, tokens[client], 0.01 * (i + 1))
        assert server.proc.wait(600) == 0, server.log.read_text()[-3000:]  # --rounds 2: it stops after round 2
    finally:
        server.stop()
    log = server.log.read_text()
    served = {r["round"]: r for r in RunDir(run).read_metrics()}
    assert sorted(served) == [1, 2] and RunDir(run).checkpoint_versions() == [1, 2]
    for n in (1, 2):
        assert served[n]["device_clients"] == drawn[n][:2] and served[n]["simulated_clients"] == drawn[n][2:]
        assert f"simulating client(s) {drawn[n][2]} in TFF" in log
        assert (f"finished round {n} in TFF with 2 device update(s) (clients {drawn[n][0]}, {drawn[n][1]}) and 1 "
                f"simulated client(s) (clients {drawn[n][2]})") in log
    assert (run / "config.json").read_bytes() == (reference / "config.json").read_bytes()
    assert not (run / "serve" / "round_1").exists() and not (run / "serve" / "round_2").exists()

    for n in (1, 2):  # the same uploads, then TFF's resume to the end
        shutil.copytree(RunDir(run).device_updates_dir(n), RunDir(reference).device_updates_dir(n))
    from tff_pipelines.program import driver

    driver.resume(str(reference))
    resumed = {r["round"]: r for r in RunDir(reference).read_metrics()}
    for n in (1, 2):
        a, b = RunDir(run).read_checkpoint(n)[0], RunDir(reference).read_checkpoint(n)[0]
        assert len(a) == len(b)
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert x.dtype == y.dtype and np.array_equal(x, y), f"checkpoint {n}, array {i}"
        assert {k: v for k, v in served[n].items() if k != "round_seconds"} == {
            k: v for k, v in resumed[n].items() if k != "round_seconds"}
