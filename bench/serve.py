"""The round server under load: uploads per second, upload latency (p50/p99), server memory, round open and close.

    .venv/bin/python bench/serve.py                        # 10, 50 and 200 concurrent devices
    .venv/bin/python bench/serve.py --devices 10 --quick   # a check that it runs (not committed)

For each number of devices ``D``: a fresh run (PriSM, ``--model`` at ``--width`` on 32x32x3 images, 10 classes,
``D`` clients all drawn in round 1), every client enrolled, and ``python -m export serve --min-updates D --rounds 1``
in a subprocess on 127.0.0.1. The load generator (this process, asyncio + httpx, one connection per device) has
every device fetch its assignment, ``manifest.json`` and ``weights.npz`` (and ``model.tflite``), make a valid
update (the round's weights plus 0.001: no training, so the server's work is what is measured), wait for all the
others, then upload at once. Measured:

- upload latency per device (from sending the PUT to its answer): p50, p99, max; uploads/s = ``D`` over the time
  from the first PUT to the last answer; every answer must be 201 and every update stored;
- the server's peak resident memory (``VmHWM`` of its process) and its memory before the uploads;
- round open (the server building every client's files) and round close (``finish_round``), from its log;
- the finished round against the same updates ingested one by one from files (``export ingest`` +
  ``finish-round`` on a copy of the run): equal bit for bit, or the bench fails.

Results in ``bench/results/serve/`` (``results.json``, ``README.md``) with the settings and the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "serve"
SHAPE, CLASSES = (32, 32, 3), 10


def make_run(out: Path, devices: int, model: str, width: int) -> dict[int, str]:
    from export.serve.credentials import enrol
    from prism_tf.federated.config import TrainConfig, client_budget
    from prism_tf.federated.rundir import RunDir

    config = TrainConfig(model=model, width=width, clients=devices, clients_per_round=devices, rounds=3,
                         batch_size=16, keep_ratio=0.5, seed=1, lr_schedule="constant")
    run = RunDir(out)
    run.write_config(dataclasses.asdict(config), overwrite=False)
    run.write_data_spec(SHAPE, CLASSES)
    run.write_budget(client_budget(config, SHAPE, CLASSES)[2])
    run.run_id()
    return {enrolled.device.client: enrolled.token
            for enrolled in (enrol(out, f"device-{c}", c) for c in range(devices))}


def peak_memory(pid: int) -> tuple[int, int]:
    """(current, peak) resident bytes of process ``pid``."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


async def load(url: str, tokens: dict[int, str], before_uploads) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=len(tokens) + 10, max_keepalive_connections=len(tokens) + 10)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        async def prepare(token: str) -> tuple[str, bytes, dict]:
            headers = {"Authorization": f"Bearer {token}"}
            assignment = (await http.get("/v1/assignment", headers=headers)).json()
            assert assignment["assigned"], assignment
            for name in ("manifest.json", "model.tflite"):
                (await http.get(assignment["files"][name]["url"], headers=headers)).raise_for_status()
            weights = (await http.get(assignment["files"]["weights.npz"]["url"], headers=headers)).content
            with np.load(io.BytesIO(weights)) as data:
                trained = {k: (data[k] + np.asarray(0.001, data[k].dtype)).astype(data[k].dtype) for k in data.files}
            buffer = io.BytesIO()
            np.savez(buffer, **trained)
            return token, buffer.getvalue(), assignment

        first = {"Authorization": f"Bearer {next(iter(tokens.values()))}"}
        while (await http.get("/v1/round", headers=first)).json()["state"] != "open":  # the round is being built
            await asyncio.sleep(0.2)
        began = time.perf_counter()
        prepared = await asyncio.gather(*(prepare(t) for t in tokens.values()))
        fetch_s = time.perf_counter() - began
        memory = before_uploads()

        async def put(token: str, body: bytes, assignment: dict) -> tuple[float, float, int]:
            start = time.perf_counter()
            response = await http.put(f"{assignment['upload']['url']}?examples=32", content=body,
                                      headers={"Authorization": f"Bearer {token}"})
            return start, time.perf_counter(), response.status_code

        results = await asyncio.gather(*(put(*p) for p in prepared))
    starts, ends, statuses = zip(*results, strict=True)
    latencies = np.array(ends) - np.array(starts)
    return {"fetch_s": fetch_s, "memory_before_uploads": memory, "statuses": sorted(set(statuses)),
            "accepted": statuses.count(201),
            "uploads_per_s": len(results) / (max(ends) - min(starts)),
            "latency_p50_ms": 1000 * float(np.percentile(latencies, 50)),
            "latency_p99_ms": 1000 * float(np.percentile(latencies, 99)),
            "latency_max_ms": 1000 * float(latencies.max()),
            "upload_bytes": len(prepared[0][1]), "uploads": {t: p[1] for t, p in zip(tokens, prepared, strict=True)},
            "clients": {p[2]["client"]: p[1] for p in prepared}}


def one(devices: int, model: str, width: int, base: Path) -> dict:
    from export import ingest as ingest_lib
    from prism_tf.federated.rundir import RunDir

    run = base / f"run_{devices}"
    tokens = make_run(run, devices, model, width)
    reference = Path(shutil.copytree(run, base / f"reference_{devices}"))
    log = base / f"server_{devices}.log"
    began = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "export", "serve", "--run", str(run), "--port", "0",
                               "--min-updates", str(devices), "--rounds", "1"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=open(log, "wb"), text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = server.stdout.readline().split()[2]
    measured = asyncio.run(load(url, tokens, lambda: peak_memory(server.pid)))
    memory_before = measured.pop("memory_before_uploads")
    ready = time.perf_counter() - began
    peak = memory_before[1]
    while server.poll() is None:  # the round closes, then the server stops (--rounds 1)
        try:
            peak = max(peak, peak_memory(server.pid)[1])
        except (FileNotFoundError, ProcessLookupError, KeyError):  # gone, or a zombie without memory
            break
        time.sleep(0.1)
    assert server.wait(600) == 0, log.read_text()[-3000:]
    text = log.read_text()
    build = float(re.search(r"built \d+ clients' files .* in ([\d.]+) s", text).group(1))
    close = float(re.search(r"round 1 closed in ([\d.]+) s", text).group(1))
    assert measured["accepted"] == devices and measured["statuses"] == [201], measured["statuses"]
    stored = RunDir(run).read_device_updates(1)
    assert len(stored) == devices

    # The same updates, one by one through the file path, on a copy of the run.
    work = base / f"files_{devices}"
    for client, body in measured["clients"].items():
        client_dir = work / f"client_{client}"
        client_dir.mkdir(parents=True)
        (client_dir / "upload.npz").write_bytes(body)
    equal = compare_with_files(run, reference, measured["clients"], work, ingest_lib)
    del measured["uploads"], measured["clients"]
    return {"devices": devices, **measured, "server_rss_before_uploads_mb": memory_before[0] / 2**20,
            "server_peak_rss_mb": peak / 2**20, "round_open_s": build, "round_close_s": close,
            "server_start_to_uploads_done_s": ready, "equal_to_one_by_one_ingest": equal}


def compare_with_files(run: Path, reference: Path, bodies: dict[int, bytes], work: Path, ingest_lib) -> bool:
    from export.client import client_round
    from prism_tf.federated.replay import RoundReplay
    from prism_tf.federated.rundir import RunDir

    replay = RoundReplay(reference, 1)
    for client in sorted(bodies):
        client_dir = work / f"client_{client}"
        sent = client_round(replay, client)
        (client_dir / "manifest.json").write_text(json.dumps(sent.manifest))
        ingest_lib.ingest(reference, client_dir, client_dir / "upload.npz", examples=32)
    ingest_lib.finish_round(reference)
    a, b = RunDir(run).read_checkpoint(1)[0], RunDir(reference).read_checkpoint(1)[0]
    return len(a) == len(b) and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[10, 50, 200])
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="do not write bench/results/serve")
    options = parser.parse_args()
    from prism_tf.quiet import import_tensorflow

    import_tensorflow()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        for devices in options.devices:
            load_before = os.getloadavg()[0]
            row = one(devices, options.model, options.width, Path(tmp))
            row["load_average_before"] = load_before
            rows.append(row)
            print(json.dumps(row), flush=True)
    if options.quick:
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    settings = {"model": options.model, "width": options.width, "input": list(SHAPE), "classes": CLASSES,
                "keep_ratio": 0.5, "method": "prism", "cores": os.cpu_count(), "python": sys.version.split()[0]}
    (OUT / "results.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))
    lines = ["# Round server under load (bench/serve.py)", "",
             f"Settings: {json.dumps(settings)}. One round, every device drawn, all uploads at once after every "
             "device fetched its files; server and load generator on the same machine.", "",
             "| devices | uploads/s | p50 ms | p99 ms | max ms | upload KB | server RSS MB (before / peak) | "
             "round open s | round close s | = one-by-one ingest | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['devices']} | {r['uploads_per_s']:.1f} | {r['latency_p50_ms']:.0f} | "
                     f"{r['latency_p99_ms']:.0f} | {r['latency_max_ms']:.0f} | {r['upload_bytes'] / 1024:.0f} | "
                     f"{r['server_rss_before_uploads_mb']:.0f} / {r['server_peak_rss_mb']:.0f} | "
                     f"{r['round_open_s']:.1f} | {r['round_close_s']:.1f} | {r['equal_to_one_by_one_ingest']} | "
                     f"{r['load_average_before']:.1f} |")
    (OUT / "README.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
