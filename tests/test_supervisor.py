"""`tunery up` supervises: a killed service (Redis included) comes back alone, several stacks share a
host without port settings, and Ctrl-C stops everything within seconds with nothing killed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from cli.supervisor import RESTART_BUDGET, Child
from tests.api_fixtures import chat_lines
from tests.helpers import free_port, port_open, stop_process, wait_for
from tests.live import REPO

pytestmark = pytest.mark.slow

UP_LINE = re.compile(
    r"Tunery is up at (\S+) .*?trainer :(\d+), evaluator :(\d+), inference :(\d+)", re.DOTALL
)


@dataclass
class Stack:
    process: subprocess.Popen
    log: Path
    data_dir: Path
    base_url: str
    metrics_ports: dict[str, int]

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def child(self, name: str) -> int:
        """The pid of the supervised process `name` (redis-server or a `tunery <name>`)."""
        for pid in Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split():
            command = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
            if (name == "redis" and b"redis-server" in command[0]) or command[-2:] == [b"cli", name.encode()]:
                return int(pid)
        raise LookupError(name)

    def redis_url(self) -> str:
        return (self.data_dir / "redis" / "url").read_text()

    def key(self) -> str:
        return (self.data_dir / "api-key").read_text().strip()


def start_stack(tmp_path: Path, name: str) -> Stack:
    """`tunery up` with nothing but --port and --data-dir, as a user runs a second one; ready when it says so."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNERY_")}
    directory = tmp_path / name
    directory.mkdir()
    log = directory / "up.log"
    port = free_port()
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "cli", "up", "--port", str(port), "--data-dir", str(directory / "data")],
            cwd=REPO, env=env | {"COLUMNS": "1000"}, stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
    wait_for(lambda: UP_LINE.search(log.read_text()), 120, f"stack {name}", process)
    match = UP_LINE.search(log.read_text())
    ports = dict(zip(("trainer", "evaluator", "inference"), map(int, match.groups()[1:]), strict=True))
    return Stack(process, log, directory / "data", match.group(1), ports)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = start_stack(tmp_path_factory.mktemp("stacks"), "a")
    try:
        yield running
    finally:
        stop_process(running.process, timeout=60)


def test_up_is_said_only_once_every_service_answers(stack: Stack):
    before_up = stack.output().split("Tunery is up")[0]
    for service in ("trainer", "evaluator", "inference"):
        assert f"{service} worker listening" in before_up
    assert "Application startup complete" in before_up
    assert all(port_open(port) for port in stack.metrics_ports.values())


def test_a_sigkilled_trainer_is_restarted_alone_on_its_metrics_port(stack: Stack):
    others = {name: stack.child(name) for name in ("api", "evaluator", "inference", "redis")}
    killed = stack.child("trainer")
    os.kill(killed, signal.SIGKILL)
    wait_for(lambda: stack.child("trainer") != killed, 30, "a new trainer")
    wait_for(lambda: port_open(stack.metrics_ports["trainer"]), 60, "the new trainer's metrics")
    assert {name: stack.child(name) for name in others} == others
    assert httpx.get(f"{stack.base_url}/readyz").status_code == 200


def test_a_sigkilled_inference_worker_is_restarted_and_answers_again(stack: Stack):
    killed = stack.child("inference")
    os.kill(killed, signal.SIGKILL)
    wait_for(lambda: stack.child("inference") != killed, 30, "a new inference worker")
    wait_for(lambda: port_open(stack.metrics_ports["inference"]), 60, "the new inference worker's metrics")
    answer = httpx.post(
        f"{stack.base_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {stack.key()}"},
        json={"model": "tunery/tiny-chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["role"] == "assistant"


def test_a_sigkilled_redis_comes_back_on_its_port_with_every_acknowledged_write(stack: Stack):
    url = stack.redis_url()
    client = redis.Redis.from_url(url)
    client.set("written-just-before-the-crash", "kept")
    killed = stack.child("redis")
    os.kill(killed, signal.SIGKILL)
    wait_for(lambda: stack.child("redis") != killed and client.ping(), 30, "redis back")
    assert stack.redis_url() == url
    assert client.get("written-just-before-the-crash") == b"kept"
    headers = {"Authorization": f"Bearer {stack.key()}"}
    wait_for(lambda: httpx.get(f"{stack.base_url}/v1/files", headers=headers).status_code == 200, 30, "API")
    for name in ("api", "trainer", "evaluator", "inference"):
        stack.child(name)  # every service still there


def test_a_stack_on_a_port_in_use_says_so_instead_of_starting(stack: Stack, tmp_path: Path):
    port = stack.base_url.rsplit(":", 1)[1]
    refused = subprocess.run(
        [sys.executable, "-m", "cli", "up", "--port", port, "--data-dir", str(tmp_path / "data")],
        cwd=REPO, env={k: v for k, v in os.environ.items() if not k.startswith("TUNERY_")},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 1
    assert f"127.0.0.1:{port} is already in use (another Tunery?)" in refused.stderr
    assert not (tmp_path / "data" / "redis").exists()


def test_a_second_stack_runs_beside_the_first_and_ctrl_c_stops_it_while_training_in_seconds(
    stack: Stack, tmp_path: Path
):
    second = start_stack(tmp_path, "b")
    try:
        assert set(second.metrics_ports.values()).isdisjoint(stack.metrics_ports.values())
        headers = {"Authorization": f"Bearer {second.key()}"}
        with httpx.Client(base_url=second.base_url, headers=headers, timeout=30) as client:
            file = client.post(
                "/v1/files", files={"file": ("t.jsonl", chat_lines(12))}, data={"purpose": "fine-tune"}
            ).json()
            method = {
                "type": "supervised",
                "supervised": {"hyperparameters": {"n_epochs": 50, "batch_size": 1}},
            }
            job = client.post(
                "/v1/fine_tuning/jobs",
                json={"model": "tunery/tiny-chat", "training_file": file["id"], "method": method},
            ).json()
            # Stopped while it trains, with a client following it (as `tunery logs -f` does).
            wait_for(
                lambda: client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["progress"]["step"] > 0,
                120,
                "training",
            )
            with client.stream(
                "GET", f"/v1/fine_tuning/jobs/{job['id']}/events", params={"stream": "true"}
            ) as sse:
                lines = sse.iter_lines()
                next(lines)
                started = time.monotonic()
                second.process.send_signal(signal.SIGINT)
                rest = list(lines)
            assert second.process.wait(timeout=60) == 0
            took = time.monotonic() - started
        assert any('"status": "server_stopping"' in line for line in rest), rest[-5:]
        assert took <= 10, f"stopping took {took:.1f} s"
        # The job went back to its queue with a checkpoint to carry on from at the next start.
        manifest = second.data_dir / "storage" / "tenants" / "org-default" / "jobs" / job["id"] / "job.json"
        record = json.loads(manifest.read_text())
        assert record["state"] == "queued" and record["resume_checkpoint"] is not None
        output = second.output()
        assert "Tunery stopped." in output and "killing it" not in output
        for port in second.metrics_ports.values():
            assert not port_open(port)
        assert httpx.get(f"{stack.base_url}/readyz").status_code == 200  # the first stack never noticed
    finally:
        stop_process(second.process, timeout=60)


def test_a_service_that_keeps_exiting_is_given_up_alone_while_another_keeps_running():
    failing = Child("failing", [sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ), lambda: True)
    steady = Child(
        "steady", [sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ), lambda: True
    )
    failing.backoff = 0.0  # no waiting between restarts here
    failing.start()
    steady.start()
    try:
        deadline = time.monotonic() + 60
        while not failing.given_up:
            assert time.monotonic() < deadline
            for child in (failing, steady):
                child.check(time.monotonic())
            time.sleep(0.05)
        assert len(failing.exits) == RESTART_BUDGET + 1 and failing.process.returncode == 3
        assert steady.running()
    finally:
        for child in (failing, steady):
            child.stop()
            child.wait(time.monotonic() + 5)
