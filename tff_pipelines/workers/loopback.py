"""Keeps TFF's worker_binary off the network: its listening socket is bound to loopback (or one chosen address).

`worker_binary --port=P` listens on ``[::]:P``, every interface, and has neither an address flag nor
authentication, while it runs whatever TensorFlow graph it is sent. We start it with ``LD_PRELOAD`` set to a tiny
shim (``bind_shim.c`` beside this file) that rewrites its wildcard ``bind()`` to the target address and refuses
any other non-loopback one. Why this and not a private network namespace or a Unix socket: see
docs/pitfalls.md, "The TFF worker process".

The shim is compiled on first use with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``) into a
per-user cache directory (``$XDG_CACHE_HOME/prism-tf`` or ``~/.cache/prism-tf``, mode 0700), named by the hash of
the source, and renamed into place atomically, so concurrent first runs are safe and an edited source never uses
a stale library. With no compiler the worker does not start (`WorkerExposureError`), unless the user opts out
with ``TFF_PIPELINES_WORKER_ALL_INTERFACES=1`` (the worker then listens on every interface, as TFF's own does).

`listening_addresses` reads a process's listening TCP sockets from ``/proc`` (its fds and its network namespace's
``net/tcp{,6}``): the runtime connects to the address actually bound and refuses a worker bound more widely.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

__all__ = [
    "BIND_ENV_VAR",
    "OPT_OUT_ENV_VAR",
    "WorkerExposureError",
    "is_loopback",
    "listening_addresses",
    "shim_environment",
    "shim_library",
]

BIND_ENV_VAR = "PRISM_TF_WORKER_BIND"  # read by the shim: the address that replaces a wildcard bind
OPT_OUT_ENV_VAR = "TFF_PIPELINES_WORKER_ALL_INTERFACES"  # "1": start the worker unconfined (no compiler needed)
_SOURCE = Path(__file__).with_name("bind_shim.c")
_COMPILE_TIMEOUT_S = 120.0
_TCP_LISTEN = "0A"  # st column of /proc/net/tcp{,6}


class WorkerExposureError(RuntimeError):
    """The worker cannot be confined to the requested address (no compiler, failed build, wider bind)."""


def opted_out() -> bool:
    """True if the user asked for an unconfined worker (``TFF_PIPELINES_WORKER_ALL_INTERFACES=1``)."""
    return os.environ.get(OPT_OUT_ENV_VAR, "").strip() == "1"


def is_wildcard(address: str) -> bool:
    """``0.0.0.0``, ``::`` (or an empty string): every interface."""
    return address in ("", "*") or ipaddress.ip_address(address).is_unspecified


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback (``::ffff:127.0.0.1``)."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = Path(base) / "prism-tf"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = path.stat()
    # A directory others can write to would let them swap the library the worker preloads.
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise WorkerExposureError(f"{path} must be owned by you and not writable by group/others "
                                  f"(it holds the worker's bind shim); fix with: chmod go-w {path}")
    return path


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc)
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    return None


def shim_library() -> Path:
    """Path of the compiled bind shim, building it on first use (see the module docstring).

    Raises:
      WorkerExposureError: no C compiler, or the build failed (its output is in the message).
    """
    source = _SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    cache = _cache_dir()
    library = cache / f"bind_shim-{digest}.so"
    if library.is_file():
        return library
    cc = _compiler()
    if cc is None:
        raise WorkerExposureError(
            "cannot confine the TFF worker to loopback: no C compiler found (install gcc, or set $CC) to build "
            f"its bind shim; or set {OPT_OUT_ENV_VAR}=1 to accept a worker listening on every interface "
            "(docs/pitfalls.md, \"The TFF worker process\")")
    fd, tmp = tempfile.mkstemp(prefix=".bind_shim-", suffix=".so", dir=cache)
    os.close(fd)
    try:
        result = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-Wall", "-o", tmp, str(_SOURCE), "-ldl"],
                                capture_output=True, text=True, timeout=_COMPILE_TIMEOUT_S, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise WorkerExposureError(f"building the TFF worker's bind shim with {cc} failed "
                                      f"(exit {result.returncode}):\n{result.stderr.strip()}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, library)  # atomic: a concurrent first run sees no file or a whole one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return library


def shim_environment(address: str | None = None) -> dict[str, str]:
    """The environment for a worker confined to ``address`` (None: loopback): ``os.environ`` plus the shim.

    Raises:
      WorkerExposureError: as `shim_library`.
      ValueError: ``address`` is not a numeric IP address, or is a wildcard (nothing to confine).
    """
    if address is not None:
        ip = ipaddress.ip_address(address)  # ValueError names the bad address
        if ip.is_unspecified:
            raise ValueError(f"{address} is every interface: start the worker without the shim instead")
    env = dict(os.environ)
    preload = env.get("LD_PRELOAD", "").strip()
    env["LD_PRELOAD"] = f"{shim_library()}{' ' + preload if preload else ''}"
    env[BIND_ENV_VAR] = "" if address is None else str(ipaddress.ip_address(address))
    return env


def _parse_proc_address(hex_address: str) -> tuple[str, int]:
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    # /proc prints each 32-bit word in host byte order (little-endian on x86 and arm64 Linux).
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(raw)), int(port, 16)


def listening_addresses(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket held by process ``pid``, read from ``/proc``.

    Addresses are as bound: ``0.0.0.0`` / ``::`` mean every interface. Needs permission to read
    ``/proc/<pid>/fd`` (same user). Raises OSError if the process is gone.
    """
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = []
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                lines = f.read().splitlines()[1:]
        except FileNotFoundError:
            continue  # e.g. no IPv6 in this kernel
        for line in lines:
            cols = line.split()
            if len(cols) > 9 and cols[3] == _TCP_LISTEN and cols[9] in inodes:
                found.append(_parse_proc_address(cols[1]))
    return found
