"""A live Tunery for end-to-end tests: the real API, trainer and evaluator processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.api_fixtures import ADMIN_KEY
from tests.helpers import free_port, port_open, stop_process, wait_for

REPO = Path(__file__).resolve().parent.parent


@dataclass
class LiveTunery:
    env: dict[str, str]
    base_url: str
    logs: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, service: str, *options: str, wait: bool = True) -> subprocess.Popen:
        """Start `tunery <service> <options…>` (e.g. "evaluator", "--queue", "prepare")."""
        log = open(self.logs / f"{service}.log", "ab")  # noqa: SIM115 - the child owns it
        process = subprocess.Popen(
            [sys.executable, "-m", "cli", service, *options],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.processes[service] = process
        if wait:
            self.wait_ready(service)
        return process

    def start_all(self, *services: str) -> None:
        """Start several services at once (their imports overlap), then wait until each answers."""
        for service in services:
            self.start(service, wait=False)
        for service in services:
            self.wait_ready(service)

    def wait_ready(self, service: str) -> None:
        """The API answers /readyz; a worker serves /metrics once it has imported its tasks."""
        if service == "api":
            ready = lambda: httpx.get(f"{self.base_url}/readyz", timeout=2).status_code == 200  # noqa: E731
        else:
            port = int(self.env[f"TUNERY_{service.upper()}_METRICS_PORT"])
            ready = lambda: port_open(port)  # noqa: E731
        wait_for(ready, timeout=90, what=f"tunery {service}", process=self.processes[service])

    def ensure_running(self, *services: str) -> None:
        """Start again whichever of `services` has stopped (a test that shares this Tunery may stop one)."""
        stopped = [s for s in services if s not in self.processes or self.processes[s].poll() is not None]
        if stopped:
            self.start_all(*stopped)

    def stop(self) -> None:
        """SIGTERM every service at once (they stop side by side), then wait for each."""
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            stop_process(process, timeout=30)

    def log_tail(self, service: str, chars: int = 4000) -> str:
        return (self.logs / f"{service}.log").read_text(errors="replace")[-chars:]

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url, timeout=30, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        )

    def start_training(self, body: dict) -> dict:
        """Create a job and wait until its trainer has taken a few optimizer steps."""
        with self.client() as client:
            job = client.post("/v1/fine_tuning/jobs", json=body).json()
            deadline = time.monotonic() + 120
            while client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["progress"]["step"] < 3:
                assert time.monotonic() < deadline, self.log_tail("trainer")
                time.sleep(0.1)
        return job

    def wait_for_job(self, job_id: str, statuses: set[str], timeout: float = 300) -> tuple[dict, list[str]]:
        """Poll the job until its status is in `statuses`; returns it and every status seen on the way."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        with self.client() as client:
            while True:
                job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
                if not seen or seen[-1] != job["status"]:
                    seen.append(job["status"])
                if job["status"] in statuses:
                    return job, seen
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"job {job_id} still {job['status']} after {timeout}s\n"
                        f"--- trainer ---\n{self.log_tail('trainer')}\n--- evaluator ---\n{self.log_tail('evaluator')}"
                    )
                time.sleep(0.1)


def live_env(tmp: Path, redis_url: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNERY_")}
    env.update(
        {
            "TUNERY_REDIS_URL": redis_url,
            "TUNERY_DATA_DIR": str(tmp / "data"),
            "TUNERY_API_PORT": str(free_port()),
            "TUNERY_TRAINER_METRICS_PORT": str(free_port()),
            "TUNERY_EVALUATOR_METRICS_PORT": str(free_port()),
            "TUNERY_INFERENCE_METRICS_PORT": str(free_port()),
            "TUNERY_PROGRESS_INTERVAL_SECONDS": "0.5",
            "TUNERY_LOG_LEVEL": "INFO",
            "TUNERY_BOOTSTRAP_API_KEY": ADMIN_KEY,
            # A lost worker is noticed in seconds here (minutes in production).
            "TUNERY_WORKER_HEARTBEAT_SECONDS": "1",
            "TUNERY_WORKER_LOST_AFTER_SECONDS": "10",
            "TUNERY_JANITOR_INTERVAL_SECONDS": "1",
        }
    )
    env.update(extra or {})
    return env
