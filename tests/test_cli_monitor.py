"""`tunery status` and `tunery logs` (cli/monitor.py) run as the user runs them, as subprocesses against a
real API process: what goes wrong is one line on stderr and a non-zero exit, ids are never cut."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from rich.console import Console

from cli.monitor import STATUS_COLUMNS, status_rows, status_table
from tests.api_fixtures import ADMIN_KEY, chat_lines
from tests.helpers import free_port
from tests.live import REPO, LiveTunery, live_env


@pytest.fixture
def api_only(tmp_path: Path, redis_url: str) -> Iterator[LiveTunery]:
    """The API process alone (storage in its data folder): jobs it creates stay in validating_files."""
    env = live_env(tmp_path, redis_url)
    (tmp_path / "logs").mkdir()
    tunery = LiveTunery(
        env=env, base_url=f"http://127.0.0.1:{env['TUNERY_API_PORT']}", logs=tmp_path / "logs"
    )
    tunery.start("api")
    try:
        yield tunery
    finally:
        tunery.stop()


def cli_env(base: dict[str, str] | None = None, key: str = ADMIN_KEY) -> dict[str, str]:
    env = {k: v for k, v in (base or os.environ).items() if k != "COLUMNS"}
    return env | {"TUNERY_API_KEY": key, "PYTHONUNBUFFERED": "1"}


def tunery(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )


def create_jobs(live: LiveTunery, n: int) -> list[str]:
    with live.client() as client:
        file = client.post(
            "/v1/files", files={"file": ("t.jsonl", chat_lines(20))}, data={"purpose": "fine-tune"}
        )
        body = {"model": "tunery/tiny-chat", "training_file": file.json()["id"]}
        return [client.post("/v1/fine_tuning/jobs", json=body).json()["id"] for _ in range(n)]


@pytest.mark.parametrize("args", [["logs"], ["logs", "-f"]])
def test_logs_of_a_job_that_does_not_exist_says_so_in_one_line(api_only: LiveTunery, args: list[str]):
    result = tunery(cli_env(api_only.env), *args, "ftjob-nope")
    assert (result.returncode, result.stdout, result.stderr) == (
        1,
        "",
        "No such fine-tuning job: ftjob-nope (HTTP 404)\n",
    )


@pytest.mark.parametrize("args", [["status"], ["logs", "ftjob-nope"], ["logs", "-f", "ftjob-nope"]])
def test_a_refused_key_is_said_in_one_line(api_only: LiveTunery, args: list[str]):
    result = tunery(cli_env(api_only.env, key="tun_not-a-key"), *args)
    refused = "the API key was refused: Incorrect or revoked API key (set TUNERY_API_KEY to a valid key)\n"
    assert (result.returncode, result.stdout, result.stderr) == (1, "", refused)


@pytest.mark.parametrize("args", [["status"], ["logs", "ftjob-nope"], ["logs", "-f", "ftjob-nope"]])
def test_a_server_that_is_not_running_is_said_in_one_line(args: list[str]):
    url = f"http://127.0.0.1:{free_port()}"
    result = tunery(cli_env(), *args, "--api-url", url)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.startswith(f"cannot reach Tunery at {url} (") and result.stderr.endswith(
        "is it running?\n"
    )
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "killed"])
def test_logs_follow_says_in_one_line_that_the_server_stopped(api_only: LiveTunery, stop: signal.Signals):
    (job_id,) = create_jobs(api_only, 1)
    follower = subprocess.Popen(
        [sys.executable, "-m", "cli", "logs", "-f", job_id], cwd=REPO, env=cli_env(api_only.env),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        # The first event printed: the stream is open and delivering (the API's access log says only that
        # it was asked for, and a busy machine may kill the API before the first event reaches the client).
        with ThreadPoolExecutor(1) as reader:
            first = reader.submit(follower.stdout.readline).result(timeout=60)
        api_only.processes["api"].send_signal(stop)
        _, stderr = follower.communicate(timeout=60)
    finally:
        follower.kill()
    assert "Created fine-tuning job" in first
    stopped = f"the server stopped while following job {job_id}; run `tunery logs -f {job_id}` again once it is back\n"
    assert (follower.returncode, stderr) == (1, stopped)


def test_status_piped_is_tab_separated_with_whole_ids(api_only: LiveTunery):
    jobs = create_jobs(api_only, 2)
    result = tunery(cli_env(api_only.env) | {"COLUMNS": "40"}, "status")
    assert result.returncode == 0, result.stderr
    rows = [f"{job_id}\ttunery/tiny-chat\tvalidating_files\t-\t-\t-\t-\t0.0000" for job_id in reversed(jobs)]
    assert result.stdout.splitlines() == ["\t".join(STATUS_COLUMNS), *rows]


def test_status_in_a_narrow_terminal_keeps_ids_whole(api):
    file = api.post("/v1/files", files={"file": ("t.jsonl", chat_lines(20))}, data={"purpose": "fine-tune"})
    body = {"model": "tunery/tiny-chat-qwen2", "training_file": file.json()["id"]}
    ids = [api.post("/v1/fine_tuning/jobs", json=body).json()["id"] for _ in range(2)]
    out = io.StringIO()
    Console(file=out, width=50).print(status_table(status_rows(api, 10)))
    lines = out.getvalue().splitlines()
    for job_id in ids:
        assert any(job_id in line for line in lines), out.getvalue()
