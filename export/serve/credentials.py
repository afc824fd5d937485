"""Device credentials: issued once by ``python -m export enrol``, stored only as their SHA-256 (``devices.json``).

A credential is 32 random bytes (`secrets.token_urlsafe`), shown once to the operator, who puts it on the device.
The run keeps ``sha256(token)`` per device and the client id the device trains for; a request's bearer token is
hashed and compared with every stored hash by `hmac.compare_digest` (constant time, no early exit), so neither the
stored file nor the timing reveals a credential.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Mapping
from typing import Any

from prism_tf.federated.config import stored_config
from prism_tf.federated.rundir import RunDir, RunError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def hash_token(token: str) -> str:
    """The SHA-256 hex digest of a credential: all the run stores of it."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Device:
    """An enrolled device: its name and the global client id it trains for."""

    name: str
    client: int


@dataclasses.dataclass
class Enrolled:
    """What `enrol` issued: the device and its credential (shown once; the run keeps only its hash)."""

    device: Device
    token: str
    replaced: bool

    def report(self) -> str:
        """The operator's lines: the credential, and where it goes."""
        verb = "re-enrolled (the old credential no longer works)" if self.replaced else "enrolled"
        return (f"{verb} device {self.device.name} for client {self.device.client}. Its credential (shown once; "
                f"the run keeps only its SHA-256):\n{self.token}\n"
                "The device sends it as `Authorization: Bearer <credential>` (docs/serve.md).")


def enrol(run_dir: str | os.PathLike[str], name: str, client: int | None = None, *,
          replace: bool = False) -> Enrolled:
    """Issue device ``name`` a credential to train client ``client`` (default: the lowest client no device has).

    One device per client and one client per device. ``replace`` issues a new credential to an enrolled device
    (the old one stops working). Writes only ``devices.json``.

    Raises:
      RunError: no run there, a bad name, a client the run does not have or another device has, or ``name``
        enrolled already without ``replace``.
    """
    run = RunDir(run_dir)
    clients = stored_config(run).clients
    if not _NAME.fullmatch(name):
        raise RunError(f"device name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or "
                       "digit")
    devices = run.read_devices()
    if name in devices and not replace:
        raise RunError(f"device {name} is enrolled already (client {devices[name]['client']}); --replace issues it "
                       "a new credential")
    taken = {int(d["client"]): n for n, d in devices.items() if n != name}
    if client is None:
        client = devices[name]["client"] if name in devices else next((c for c in range(clients) if c not in taken),
                                                                        None)
        if client is None:
            raise RunError(f"every one of the run's {clients} clients has a device; give --client to choose one")
    client = int(client)
    if not 0 <= client < clients:
        raise RunError(f"client {client} does not exist: the run has clients 0..{clients - 1}")
    if client in taken:
        raise RunError(f"client {client} belongs to device {taken[client]} already")
    token = secrets.token_urlsafe(32)
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    run.write_devices({**devices, name: {"client": client, "token_sha256": hash_token(token), "enrolled": now}})
    return Enrolled(Device(name, client), token, name in devices)


def authenticate(devices: Mapping[str, Mapping[str, Any]], token: str | None) -> Device | None:
    """The device whose credential is ``token`` (``None``: no such device). Compares with every stored hash."""
    if not token:
        return None
    digest = hash_token(token)
    found = None
    for name, record in devices.items():
        if hmac.compare_digest(digest, str(record.get("token_sha256", ""))):
            found = Device(name, int(record["client"]))
    return found


__all__ = ["Device", "Enrolled", "authenticate", "enrol", "hash_token"]
