"""A device's side of a served round, in Python: what an app does against ``python -m export serve``.

Imports only the standard library (urllib), numpy and LiteRT (through `export.device`), never TensorFlow, so it
runs where a phone's runtime runs. export/ANDROID.md does the same in Kotlin.

    python -m export.serve.phone --server https://HOST:PORT --credential TOKEN --data BATCHES.npz \\
        [--cache DIR] [--cafile CA.pem]

One round: ask for the assignment, download ``manifest.json`` and ``weights.npz`` (and ``model.tflite`` unless
the cache has that file already: it is content-addressed), check every file's SHA-256, train one ``train`` call
per batch of ``BATCHES.npz`` (as `export.device`), upload the weights with the number of examples. Prints one JSON
line: the round, client, HTTP status of the upload and the losses.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from export import device

_LOADING = threading.Lock()


class ServerError(Exception):
    """The server refused a request: its HTTP status and one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"HTTP {status}: {reason}")
        self.status, self.reason = status, reason


@dataclasses.dataclass
class Client:
    """An HTTP client of the round server with one device's credential."""

    server: str
    credential: str
    cafile: str | None = None
    timeout: float = 120.0

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """``(status, headers, body)`` of one request; a refusal (4xx/5xx) raises `ServerError`."""
        request = urllib.request.Request(self.server.rstrip("/") + path, data=body, method=method, headers={
            "Authorization": f"Bearer {self.credential}", **(headers or {})})
        context = ssl.create_default_context(cafile=self.cafile) if self.server.startswith("https") else None
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=context) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as e:
            if e.code == 304:
                return 304, dict(e.headers), b""
            text = e.read().decode(errors="replace")
            try:
                reason = json.loads(text)["detail"]
            except (ValueError, KeyError, TypeError):
                reason = text[:200]
            raise ServerError(e.code, reason) from None

    def json(self, method: str, path: str, body: bytes | None = None, **headers: str) -> tuple[int, dict[str, Any]]:
        """A request whose answer is JSON: ``(status, answer)``."""
        status, _, data = self.request(method, path, body, headers)
        return status, json.loads(data)


def fetch(client: Client, described: dict[str, Any], cache: Path) -> Path:
    """The file ``described`` (url, sha256, bytes) in ``cache``, downloaded unless there already; its SHA-256 is
    checked either way (a tampered cache or transfer is caught before LiteRT loads anything)."""
    path = cache / "files" / described["sha256"]
    if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != described["sha256"]:
        _, _, data = client.request("GET", described["url"])
        digest = hashlib.sha256(data).hexdigest()
        if digest != described["sha256"]:
            raise ValueError(f"{described['url']}: got SHA-256 {digest}, the assignment says {described['sha256']}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        tmp.write_bytes(data)
        tmp.replace(path)
    return path


def play_round(client: Client, x: np.ndarray, y: np.ndarray, cache: str | Path, *,
               wait: float = 600.0) -> dict[str, Any]:
    """One round on this device: assignment, files, LiteRT training on ``x``/``y`` (``[steps, batch, ...]``),
    upload. Returns what happened (``assigned: false`` when the round has no work for it). While the server
    prepares the round (503), the assignment is asked for again every second for up to ``wait`` seconds."""
    end = time.monotonic() + wait
    while True:  # 503 while the server prepares the round: ask again after a moment
        try:
            _, assignment = client.json("GET", "/v1/assignment")
            break
        except ServerError as e:
            if e.status != 503 or time.monotonic() > end:
                raise
            time.sleep(1.0)
    if not assignment["assigned"]:
        return {"round": assignment["round"], "client": assignment["client"], "assigned": False,
                "reason": assignment["reason"]}
    cache = Path(cache)
    client_dir = cache / f"round_{assignment['round']}"
    client_dir.mkdir(parents=True, exist_ok=True)
    for name, described in assignment["files"].items():
        source = fetch(client, described, cache)
        (client_dir / name).unlink(missing_ok=True)
        (client_dir / name).symlink_to(source.resolve())
    with _LOADING:  # numpy's .npy header parser is not thread-safe in CPython 3.11.7 (export.ingest)
        interpreter, manifest = device.load_interpreter(client_dir)
    if (manifest["round"], manifest["client"]) != (assignment["round"], assignment["client"]):
        raise ValueError("the manifest is not this assignment's")
    losses = device.train(interpreter, x, y)
    trained = device.get_weights(interpreter)
    buffer = io.BytesIO()
    np.savez(buffer, **trained)
    examples = int(np.prod(y.shape))
    status, answer = client.json("PUT", f"{assignment['upload']['url']}?examples={examples}", buffer.getvalue(),
                                 **{"Content-Type": "application/octet-stream"})
    return {"round": assignment["round"], "client": assignment["client"], "assigned": True, "status": status,
            "examples": examples, "losses": losses, "answer": answer, "weights": trained}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.serve.phone", description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True, help="the round server's URL (http(s)://HOST:PORT)")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--credential", help="the device's credential (python -m export enrol)")
    who.add_argument("--credentials", help="a JSON list of credentials: that many devices at once, one thread each")
    parser.add_argument("--data", required=True, help=".npz with x [steps, batch, H, W, C] and y [steps, batch]")
    parser.add_argument("--cache", default="phone-cache", help="where downloaded files are kept (by SHA-256)")
    parser.add_argument("--cafile", help="CA certificate to trust (a self-signed server's certificate)")
    parser.add_argument("--out", help="directory for each device's uploaded weights (trained_<client>.npz)")
    options = parser.parse_args(argv)
    with np.load(options.data, allow_pickle=False) as data:
        x, y = data["x"], data["y"]
    tokens = [options.credential] if options.credential else json.loads(Path(options.credentials).read_text())
    reports: list[dict[str, Any]] = [{} for _ in tokens]

    def one(i: int) -> None:
        cache = Path(options.cache) / (f"device_{i}" if len(tokens) > 1 else "")
        try:
            reports[i] = play_round(Client(options.server, tokens[i], options.cafile), x, y, cache)
        except ServerError as e:
            reports[i] = {"error": str(e), "status": e.status}
        if options.out and "weights" in reports[i]:
            Path(options.out).mkdir(parents=True, exist_ok=True)
            np.savez(Path(options.out) / f"trained_{reports[i]['client']}.npz", **reports[i]["weights"])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(tokens))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for report in reports:
        report.pop("weights", None)
        print(json.dumps({**report, "tensorflow": "tensorflow" in sys.modules}))
    return 1 if any("error" in r for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["Client", "ServerError", "fetch", "play_round"]
