"""Scale-out: clients per second of PriSM rounds on 1, 2 and 3 TFF workers, and where a round's time goes.

    .venv/bin/python bench/scale.py                   # the accuracy bench's quick settings (CIFAR-10, 5 clients)
    .venv/bin/python bench/scale.py --profile tiny    # a one-minute look: synthetic 28x28 images, ResNet-18 width 4
    .venv/bin/python bench/scale.py --workers 1,2 --rounds 3

Each worker is a real `python -m tff_pipelines worker` process on loopback, so the path is the one a multi-host
deployment takes (gRPC, TFF's mergeable context splitting a round's clients over the workers), with every worker on
this machine's cores. ``local`` is the single local worker `tff_pipelines.workers.runtime` starts, for reference.

Per configuration: one untimed round (tracing and the workers' first compilation), then ``--rounds`` timed rounds,
each measured three ways, in order:

- ``round_s``: `PrismProcess.next` (what training runs), wall time;
- ``clients_s``: the round's client phase alone (distribution, local training, aggregation: everything before the
  server step, split over the workers), wall time, with ``worker_cpu_s`` (CPU time the worker processes spent:
  the clients' work) and ``trainer_cpu_s`` (CPU time of this process meanwhile: serializing the weights and client
  data to the workers and the sums back, i.e. the transfer's cost on the trainer's side);
- ``server_s``: the server step alone (`PrismProcess.finish`, aggregation finish, server optimizer,
  re-factorization), wall time.

``clients_per_s`` = clients per round / median ``round_s``. Medians over the timed rounds. The machine has 2 cores:
more workers than cores cannot go faster here; the numbers show what splitting costs, and a deployment with one
worker per host adds their cores. Writes ``bench/results/scale/<profile>/results.json`` and ``README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import portpicker
from accuracy import QUICK_COMMON  # the accuracy bench's shared settings (this script's directory is on sys.path)

ROOT = Path(__file__).resolve().parents[1]

TINY = ("--model", "resnet18", "--width", "4", "--clients", "8", "--clients-per-round", "4", "--batch-size", "8",
        "--keep-ratio", "0.2", "--seed", "0")
_LISTENING = re.compile(r"listening on (\S+:\d+) .*; pid (\d+),")


def _tiny_dataset(root: Path) -> Path:
    """Class folders of 28x28 grayscale noise with a bright band per class (as the tests' `shapes_dataset`)."""
    from PIL import Image

    rng = np.random.default_rng(1234)
    for split, per_class in (("train", 48), ("test", 12)):
        for c in range(3):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = rng.integers(0, 90, (28, 28), dtype=np.uint8)
                img[:, c * 9:(c + 1) * 9] += np.uint8(140)
                Image.fromarray(img).save(folder / f"{i:03d}.png")
    return root


def _config(profile: str, scratch: Path):
    from tff_pipelines.program import cli, driver

    if profile == "tiny":
        args = [*TINY, "--dataset", str(_tiny_dataset(scratch / "data"))]
    else:
        args = list(QUICK_COMMON)
    parsed = vars(cli.build_parser().parse_args(["train", *args, "--out", str(scratch / "run")]))
    options = {k: v for k, v in parsed.items() if k not in ("command", "out", "overwrite", "workers")}
    if options.get("clip_norm") == 0:
        options["clip_norm"] = None
    return driver.TrainConfig(**options), args


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Worker:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tff_pipelines", "worker",
                                      "--port", str(portpicker.pick_unused_port())],
                                     cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        m = _LISTENING.search(line)
        if not m:
            raise RuntimeError(f"worker did not start: {line!r}")
        self.target, self.pid = m.group(1), int(m.group(2))

    def cpu_s(self) -> float:
        return _cpu_s(self.pid)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)


def _measure(simulation, process, rounds: int, worker_cpu) -> dict:
    state = process.initialize()
    clients_per_round = simulation.config.clients_per_round
    rows = []
    for r in range(rounds + 1):  # round 0: tracing and first compilation, not timed
        ids = simulation.round_clients(r)
        datasets = simulation.client_datasets(r, ids)
        began = time.perf_counter()
        new_state, _ = process.next(state, datasets, client_ids=ids)
        round_s = time.perf_counter() - began

        selections = process.selections(state, ids)
        key = process.layout.sizes_key
        inputs = process.client_inputs(process.layout, datasets, selections, process.round_index(state))
        cpu0, wcpu0, began = time.process_time(), worker_cpu(), time.perf_counter()
        acc, metrics = process.client_phase(key)(state["weights"], inputs)
        clients_s = time.perf_counter() - began
        trainer_cpu_s, worker_cpu_s = time.process_time() - cpu0, worker_cpu() - wcpu0
        began = time.perf_counter()
        process.finish(state, acc, metrics)
        server_s = time.perf_counter() - began
        if r > 0:
            rows.append(dict(round_s=round_s, clients_s=clients_s, worker_cpu_s=worker_cpu_s,
                             trainer_cpu_s=trainer_cpu_s, server_s=server_s))
        state = new_state
    result = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
    result["clients_per_s"] = clients_per_round / result["round_s"]
    result["load_avg_1min"] = os.getloadavg()[0]  # the machine is shared: how busy it was meanwhile
    result["rounds"] = rows
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=("quick", "tiny"), default="quick")
    parser.add_argument("--workers", default="1,2,3", help="worker counts to measure (default 1,2,3)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per configuration (default 3)")
    parser.add_argument("--no-local", action="store_true", help="skip the local-worker reference")
    args = parser.parse_args(argv)

    import tensorflow_federated as tff

    from tff_pipelines.program import driver
    from tff_pipelines.workers import remote as workers
    from tff_pipelines.workers import runtime

    scratch = Path(tempfile.mkdtemp(prefix="prism_scale_"))
    try:
        config, train_args = _config(args.profile, scratch)
        simulation = driver.Simulation(config, str(scratch / "run"), log=lambda _: None)
        process = simulation.process
        results = {}
        if not args.no_local:
            runtime.install_local_context()
            pid = runtime.worker_pids()[0]
            results["local"] = _measure(simulation, process, args.rounds, lambda: _cpu_s(pid))
            print("local", json.dumps({k: round(v, 3) for k, v in results["local"].items() if k != "rounds"}),
                  flush=True)
        for n in [int(x) for x in args.workers.split(",")]:
            pool = [_Worker() for _ in range(n)]
            try:
                context = workers.build_context([w.target for w in pool])
                with tff.framework.get_context_stack().install(context):
                    results[str(n)] = _measure(simulation, process, args.rounds,
                                               lambda pool=pool: sum(w.cpu_s() for w in pool))
            finally:
                for w in pool:
                    w.stop()
            print(n, json.dumps({k: round(v, 3) for k, v in results[str(n)].items() if k != "rounds"}), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    out = ROOT / "bench" / "results" / "scale" / args.profile
    out.mkdir(parents=True, exist_ok=True)
    settings = " ".join("(synthetic 28x28 class folders)" if a.startswith(str(scratch)) else a for a in train_args)
    (out / "results.json").write_text(json.dumps(dict(profile=args.profile, settings=settings, results=results,
                                                      cores=os.cpu_count()), indent=2))
    lines = [f"# scale-out bench `{args.profile}`", "",
             f"Command: `.venv/bin/python bench/scale.py --profile {args.profile}`; settings `{settings}`; "
             f"{os.cpu_count()} cores, every worker on this machine. Medians of {args.rounds} timed rounds.", "",
             "| workers | clients/s | round s | client phase s | worker CPU s | trainer CPU s | server step s | "
             "load avg |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['clients_per_s']:.2f} | {r['round_s']:.2f} | {r['clients_s']:.2f} | "
                     f"{r['worker_cpu_s']:.2f} | {r['trainer_cpu_s']:.2f} | {r['server_s']:.2f} | "
                     f"{r['load_avg_1min']:.1f} |")
    lines += ["", "`local`: the one worker `tff_pipelines.workers.runtime` starts (no gRPC split); a number: that many "
              "`python -m tff_pipelines worker` processes under TFF's mergeable context. The client phase is "
              "distribution, training and aggregation; worker CPU is the clients' work, trainer CPU the "
              "serialization to and from the workers (the transfer's cost here: loopback has no wire time). "
              "`load avg`: the machine's 1-minute load average after the configuration (other jobs share its "
              "2 cores; wall times are only comparable at similar load, CPU times less affected)."]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}/README.md")
    return 0


if __name__ == "__main__":
    import prism_tf.quiet

    prism_tf.quiet.import_tensorflow()  # TensorFlow without its CPU-only start-up noise
    sys.exit(main())
