"""`tunery up`: the whole service from one command, on its embedded Redis and local storage."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.api_fixtures import IDENTITY_CHAT
from tests.helpers import free_port, port_open, stop_process, wait_for
from tests.live import REPO

pytestmark = pytest.mark.slow


def test_tunery_up_runs_a_job_end_to_end_and_stops_cleanly_on_ctrl_c(tmp_path: Path):
    port, trainer_port, evaluator_port, inference_port = free_port(), free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNERY_")}
    env |= {
        "TUNERY_TRAINER_METRICS_PORT": str(trainer_port),
        "TUNERY_EVALUATOR_METRICS_PORT": str(evaluator_port),
        "TUNERY_INFERENCE_METRICS_PORT": str(inference_port),
        "TUNERY_PROGRESS_INTERVAL_SECONDS": "1",
    }
    data_dir = tmp_path / "data"
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "cli", "up", "--port", str(port), "--data-dir", str(data_dir)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{base}/readyz").status_code == 200, 60, "tunery up", process)
        workers = (trainer_port, evaluator_port, inference_port)
        wait_for(lambda: all(port_open(p) for p in workers), 60, "workers", process)
        key = (data_dir / "api-key").read_text().strip()
        assert (data_dir / "api-key").stat().st_mode & 0o777 == 0o600
        with httpx.Client(base_url=base, timeout=30, headers={"Authorization": f"Bearer {key}"}) as client:
            assert client.get("/v1/files", headers={"Authorization": "Bearer wrong"}).status_code == 401
            file = client.post(
                "/v1/files",
                files={"file": ("identity.jsonl", IDENTITY_CHAT.read_bytes())},
                data={"purpose": "fine-tune"},
            ).json()
            job = client.post(
                "/v1/fine_tuning/jobs",
                json={
                    "model": "tunery/tiny-chat",
                    "training_file": file["id"],
                    "hyperparameters": {"n_epochs": 2},
                },
            ).json()
            deadline = time.monotonic() + 300
            while (status := client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"]) not in {
                "succeeded",
                "failed",
            }:
                assert time.monotonic() < deadline, (tmp_path / "up.log").read_text()[-3000:]
                time.sleep(0.2)
        assert status == "succeeded"
        # Redis kept its data with AOF under the data folder; files went to local storage.
        assert list((data_dir / "redis").glob("appendonlydir/*.aof"))
        manifest = data_dir / "storage" / "tenants" / "org-default" / "jobs" / job["id"] / "job.json"
        assert '"state": "succeeded"' in manifest.read_text()

        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=90) == 0
        for open_port in (port, trainer_port, evaluator_port, inference_port):
            assert not port_open(open_port)
    finally:
        stop_process(process)
        log.close()
    output = (tmp_path / "up.log").read_text()
    assert "Tunery stopped." in output
    redis_port = int(re.search(r"redis-server \(AOF on\) at redis://127.0.0.1:(\d+)", output).group(1))
    assert not port_open(redis_port)
