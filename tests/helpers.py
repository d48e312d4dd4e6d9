"""Helpers for tests that start real processes (redis-server, moto, Tunery services)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Never hand out the default Redis port: a developer's own redis may be listening there.
_RESERVED_PORTS = {6379}


@dataclass(frozen=True)
class RedisServer:
    url: str
    port: int
    dir: Path


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    port: int
    access_key_id: str = "testing"
    secret_access_key: str = "testing"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _RESERVED_PORTS:
            return port


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for(
    predicate: Callable[[], object],
    timeout: float,
    what: str,
    process: subprocess.Popen | None = None,
    interval: float = 0.05,
) -> None:
    """Poll until `predicate()` is truthy; fail fast if `process` exits, clearly on timeout.

    Exceptions from the predicate count as "not yet", since services refuse connections
    while starting.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            if predicate():
                return
        except Exception as exc:
            last_error = exc
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what}: process exited with code {process.returncode} before it was ready")
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise TimeoutError(f"{what} not ready after {timeout:.0f}s{detail}")
        time.sleep(interval)


def stop_process(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it does not exit in time."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)


class RedisProcess:
    """A redis-server of a test's own, to kill and bring back on the same port with its append-only file
    (written with every command, as `tunery up` runs it)."""

    def __init__(self, directory: Path):
        self.port = free_port()
        self.dir = directory
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
            "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
            "--logfile", str(self.dir / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_for(lambda: port_open(self.port), 30, f"redis-server on {self.port}", self.process)

    def kill(self) -> None:
        """SIGKILL: no shutdown save, as in a crash."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
