"""`tunery up`: one embedded Redis (when none is configured) and the four services (API, trainer,
evaluator, inference) as child processes, restarted if one dies, all stopped cleanly on Ctrl-C or SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from redis import Redis
from rich.console import Console

from shared.api_keys import KeyStore
from shared.records import DEFAULT_TENANT
from shared.settings import Settings

console = Console(stderr=True)

SERVICES = ("api", "trainer", "evaluator", "inference")
STOP_GRACE_SECONDS = 60
RESTART_BACKOFF_SECONDS = 2.0


class SupervisorError(Exception):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis(data_dir: Path) -> tuple[subprocess.Popen, str]:
    """A private redis-server with AOF on, since the job records live in it."""
    executable = shutil.which("redis-server")
    if executable is None:
        raise SupervisorError(
            "redis-server is not installed: run `apt-get install -y redis-server` (or `scripts/tunery up`, "
            "which installs it), or set TUNERY_REDIS_URL to an existing Redis"
        )
    redis_dir = data_dir / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [
        executable,
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--dir", str(redis_dir.resolve()),
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--maxmemory-policy", "noeviction",
        "--daemonize", "no",
        "--logfile", str((redis_dir / "redis.log").resolve()),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    (redis_dir / "url").write_text(url)  # so `tunery keys` finds the embedded Redis
    client = Redis.from_url(url, socket_connect_timeout=1)
    deadline = time.monotonic() + 30
    while True:
        try:
            client.ping()
            break
        except Exception:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SupervisorError(f"redis-server did not start; see {redis_dir / 'redis.log'}") from None
            time.sleep(0.1)
    client.close()
    return process, url


@dataclass
class Child:
    name: str
    command: list[str]
    env: dict[str, str]
    process: subprocess.Popen | None = None
    restarts: list[float] = field(default_factory=list)

    def start(self) -> None:
        self.process = subprocess.Popen(self.command, env=self.env, stdin=subprocess.DEVNULL)


def run_up(settings: Settings) -> int:
    data_dir = settings.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    stopping = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    env = dict(os.environ)
    env["TUNERY_DATA_DIR"] = str(data_dir.resolve())
    env["TUNERY_API_HOST"] = settings.api_host
    env["TUNERY_API_PORT"] = str(settings.api_port)
    redis_process = None
    if settings.redis_url is None:
        redis_process, env["TUNERY_REDIS_URL"] = start_redis(data_dir)
        console.print(
            f"[dim]redis-server (AOF on) at {env['TUNERY_REDIS_URL']}, data in {data_dir / 'redis'}[/]"
        )
    _announce_api_key(settings, env["TUNERY_REDIS_URL"])
    storage = f"s3://{settings.s3_bucket}" if settings.s3_bucket else str(settings.resolved_storage_path)
    console.print(f"[dim]storage: {storage}[/]")

    children = [Child(name, [sys.executable, "-m", "cli", name], env) for name in SERVICES]
    for child in children:
        child.start()
    console.print(
        f"[bold green]Tunery is up[/] at http://{settings.api_host}:{settings.api_port} "
        f"(API docs at /docs). Press Ctrl-C to stop."
    )
    exit_code = 0
    try:
        while not stopping:
            time.sleep(0.5)
            for child in children:
                if child.process is not None and child.process.poll() is not None and not stopping:
                    code = child.process.returncode
                    now = time.monotonic()
                    child.restarts = [t for t in child.restarts if now - t < 60] + [now]
                    if len(child.restarts) > 5:
                        console.print(f"[red]{child.name} keeps exiting (code {code}); stopping Tunery[/]")
                        stopping = True
                        exit_code = 1
                        break
                    console.print(f"[yellow]{child.name} exited with code {code}; restarting it[/]")
                    time.sleep(RESTART_BACKOFF_SECONDS)
                    child.start()
    finally:
        _stop_children(children)
        if redis_process is not None:
            redis_process.terminate()
            try:
                redis_process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                redis_process.kill()
        console.print("[dim]Tunery stopped.[/]")
    return exit_code


def _announce_api_key(settings: Settings, redis_url: str) -> None:
    """First start: make an admin key for the default tenant and keep it (0600) in the data folder."""
    key_file = settings.data_dir / "api-key"
    if settings.bootstrap_api_key:
        console.print("API key: the value of TUNERY_BOOTSTRAP_API_KEY (admin, tenant org-default)")
        return
    redis = Redis.from_url(redis_url)
    keys = KeyStore(redis, settings.api_key_secret)
    if not keys.any_active():
        _, plain = keys.create(DEFAULT_TENANT, "admin", "created by tunery up")
        key_file.write_text(plain + "\n")
        key_file.chmod(0o600)
        console.print(f"Created an admin API key for {DEFAULT_TENANT}, saved in {key_file}")
    elif key_file.exists():
        console.print(f"Admin API key in {key_file}")
    else:
        console.print("Create an API key with: tunery keys create --tenant org-default --role admin")
    redis.close()


def _stop_children(children: list[Child]) -> None:
    """SIGTERM every child (a trainer stops at its next step and requeues its job), then wait."""
    running = [c for c in children if c.process is not None and c.process.poll() is None]
    for child in running:
        child.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for child in running:
        try:
            child.process.wait(timeout=max(0.1, deadline - time.monotonic()))  # type: ignore[union-attr]
        except subprocess.TimeoutExpired:
            console.print(f"[yellow]{child.name} did not stop in {STOP_GRACE_SECONDS} s; killing it[/]")
            child.process.kill()  # type: ignore[union-attr]
            child.process.wait()  # type: ignore[union-attr]
