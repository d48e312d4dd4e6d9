"""`tunery up`: one embedded Redis (when none is configured) and the four services (API, trainer,
evaluator, inference) as child processes, each supervised on its own.

A child that exits is started again after a backoff that doubles (1 s up to 30 s) and resets once it
has stayed up for a minute; a child that keeps exiting (more than RESTART_BUDGET times in
RESTART_WINDOW_SECONDS) is given up, alone: the others keep serving. Redis comes back on the same port
with its append-only file, written with every command (`appendfsync always`), so nothing it
acknowledged is lost. Each child runs in a session of its own, so Ctrl-C reaches only this supervisor,
which stops the services once (SIGTERM), waits for them, then stops Redis; on Linux the children also
get SIGTERM should the supervisor itself die. Metrics ports are picked free unless set, so several
stacks run side by side on one host.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from redis import Redis
from rich.console import Console

from shared.platform.api_keys import KeyStore
from shared.platform.records import DEFAULT_TENANT
from shared.platform.settings import Settings

console = Console(stderr=True)

SERVICES = ("api", "trainer", "evaluator", "inference")
WORKER_PORT_SETTINGS = {
    "trainer": "trainer_metrics_port",
    "evaluator": "evaluator_metrics_port",
    "inference": "inference_metrics_port",
}
FIRST_BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 30.0
HEALTHY_AFTER_SECONDS = 60.0
RESTART_BUDGET = 10
RESTART_WINDOW_SECONDS = 600.0
READY_TIMEOUT_SECONDS = 120.0
POLL_SECONDS = 0.2
# How long the API and idle workers get to stop; a trainer gets its stop grace on top (a checkpoint).
STOP_SECONDS = 10.0


class SupervisorError(Exception):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _die_with_supervisor() -> None:
    """In a child before exec: start a session of its own (no terminal Ctrl-C) and, on Linux, receive
    SIGTERM when the supervisor dies, so no service outlives `tunery up`."""
    os.setsid()
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


@dataclass
class Child:
    """One supervised process: how to start it, how to tell it is ready, and its restart history."""

    name: str
    command: list[str]
    env: dict[str, str]
    ready: Callable[[], bool]
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    restart_at: float | None = None
    backoff: float = FIRST_BACKOFF_SECONDS
    exits: list[float] = field(default_factory=list)
    given_up: bool = False

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.command, env=self.env, stdin=subprocess.DEVNULL, preexec_fn=_die_with_supervisor
        )
        self.started_at, self.restart_at = time.monotonic(), None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def check(self, now: float) -> None:
        """Notice an exit and schedule a restart after the backoff, or give up past the budget."""
        if self.given_up:
            return
        if self.restart_at is not None:
            if now >= self.restart_at:
                console.print(f"[yellow]restarting {self.name}[/]")
                self.start()
            return
        if self.process is None or self.process.poll() is None:
            return
        code = self.process.returncode
        if now - self.started_at >= HEALTHY_AFTER_SECONDS:
            self.backoff = FIRST_BACKOFF_SECONDS
        self.exits = [t for t in self.exits if now - t < RESTART_WINDOW_SECONDS] + [now]
        if len(self.exits) > RESTART_BUDGET:
            self.given_up = True
            console.print(
                f"[red]{self.name} exited {len(self.exits)} times in {RESTART_WINDOW_SECONDS:.0f} s (last code "
                f"{code}); leaving it stopped, the other services keep running. Fix it and restart Tunery.[/]"
            )
            return
        console.print(
            f"[yellow]{self.name} exited with code {code}; restarting it in {self.backoff:.0f} s[/]"
        )
        self.restart_at = now + self.backoff
        self.backoff = min(MAX_BACKOFF_SECONDS, self.backoff * 2)

    def stop(self) -> None:
        self.restart_at = None
        if self.running():
            self.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]

    def wait(self, deadline: float) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            console.print(f"[yellow]{self.name} did not stop in time; killing it[/]")
            self.process.kill()
            self.process.wait()


def redis_child(data_dir: Path, port: int) -> tuple[Child, str]:
    """A private redis-server with AOF on (every write synced), since the job records live in it."""
    executable = shutil.which("redis-server")
    if executable is None:
        raise SupervisorError(
            "redis-server is not installed: run `apt-get install -y redis-server` (or `scripts/tunery up`, "
            "which installs it), or set TUNERY_REDIS_URL to an existing Redis"
        )
    redis_dir = (data_dir / "redis").resolve()
    redis_dir.mkdir(parents=True, exist_ok=True)
    command = [
        executable,
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--dir", str(redis_dir),
        "--appendonly", "yes",
        "--appendfsync", "always",
        "--save", "",
        "--maxmemory-policy", "noeviction",
        "--daemonize", "no",
        "--logfile", str(redis_dir / "redis.log"),
    ]  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    (redis_dir / "url").write_text(url)  # so `tunery keys` finds the embedded Redis

    def answers() -> bool:
        client = Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
        try:
            return bool(client.ping())
        except Exception:
            return False
        finally:
            client.close()

    return Child("redis", command, dict(os.environ), answers), url


def service_children(settings: Settings, env: dict[str, str]) -> list[Child]:
    api_url = f"http://{settings.api_host}:{settings.api_port}"

    def api_ready() -> bool:
        try:
            return httpx.get(f"{api_url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    children = [Child("api", [sys.executable, "-m", "cli", "api"], env, api_ready)]
    for name in SERVICES[1:]:
        port = int(env[f"TUNERY_{name.upper()}_METRICS_PORT"])
        host = "127.0.0.1" if settings.metrics_host in ("0.0.0.0", "") else settings.metrics_host
        children.append(
            Child(name, [sys.executable, "-m", "cli", name], env, lambda p=port, h=host: port_open(h, p))
        )
    return children


def run_up(settings: Settings) -> int:
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    stop_requests = 0

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stop_requests
        stop_requests += 1

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    env = dict(os.environ)
    env["TUNERY_DATA_DIR"] = str(data_dir)
    env["TUNERY_API_HOST"] = settings.api_host
    env["TUNERY_API_PORT"] = str(settings.api_port)
    for name, setting in WORKER_PORT_SETTINGS.items():
        # A port set by the operator is kept; otherwise a free one, so that stacks never collide.
        port = getattr(settings, setting) if setting in settings.model_fields_set else free_port()
        env[f"TUNERY_{name.upper()}_METRICS_PORT"] = str(port)

    if port_open(settings.api_host, settings.api_port):
        raise SupervisorError(
            f"{settings.api_host}:{settings.api_port} is already in use (another Tunery?); "
            "start this one with --port and its own --data-dir"
        )
    redis = None
    children: list[Child] = []
    exit_code = 0
    try:
        if settings.redis_url is None:
            redis, env["TUNERY_REDIS_URL"] = redis_child(data_dir, free_port())
            redis.start()
            if not _wait_ready([redis], lambda: stop_requests > 0):
                return 0
            console.print(
                f"[dim]redis-server (AOF on) at {env['TUNERY_REDIS_URL']}, data in {data_dir / 'redis'}[/]"
            )
        _announce_api_key(settings, env["TUNERY_REDIS_URL"])
        storage = f"s3://{settings.s3_bucket}" if settings.s3_bucket else str(settings.resolved_storage_path)
        console.print(f"[dim]storage: {storage}[/]")
        children = service_children(settings, env)
        supervised = ([redis] if redis is not None else []) + children
        for child in children:
            child.start()
        if _wait_ready(supervised, lambda: stop_requests > 0):
            metrics = ", ".join(
                f"{name} :{env[f'TUNERY_{name.upper()}_METRICS_PORT']}" for name in WORKER_PORT_SETTINGS
            )
            console.print(
                f"[bold green]Tunery is up[/] at http://{settings.api_host}:{settings.api_port} "
                f"(console at /console, API docs at /docs; metrics at /metrics and {metrics}). "
                "Press Ctrl-C to stop."
            )
        while stop_requests == 0:
            time.sleep(POLL_SECONDS)
            now = time.monotonic()
            for child in supervised:
                child.check(now)
        exit_code = 1 if any(child.given_up for child in supervised) else 0
    finally:
        console.print("[dim]stopping Tunery…[/]")
        _stop(children, settings.stop_grace_seconds + STOP_SECONDS, lambda: stop_requests > 1)
        if redis is not None:
            _stop([redis], STOP_SECONDS, lambda: stop_requests > 1)
        console.print("[dim]Tunery stopped.[/]")
    return exit_code


def _wait_ready(children: list[Child], stopping: Callable[[], bool]) -> bool:
    """Wait until every child answers (restarting any that exits meanwhile); False if a stop came first."""
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    waiting = list(children)
    while waiting:
        if stopping():
            return False
        now = time.monotonic()
        for child in waiting:
            child.check(now)
        waiting = [
            child for child in waiting if not child.given_up and not (child.running() and child.ready())
        ]
        if waiting and now > deadline:
            names = ", ".join(child.name for child in waiting)
            console.print(f"[yellow]still waiting for {names} after {READY_TIMEOUT_SECONDS:.0f} s[/]")
            deadline = float("inf")
        if waiting:
            time.sleep(POLL_SECONDS)
    return True


def _stop(children: list[Child], seconds: float, hurry: Callable[[], bool]) -> None:
    """SIGTERM each child at once (a trainer saves a checkpoint and requeues its job), then wait for all;
    a second Ctrl-C ends the wait."""
    for child in children:
        child.stop()
    deadline = time.monotonic() + seconds
    while any(child.running() for child in children) and time.monotonic() < deadline and not hurry():
        time.sleep(POLL_SECONDS / 2)
    for child in children:
        child.wait(time.monotonic())


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
