"""`tunery api --workers N`: several uvicorn processes, one /metrics that adds them all up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.api_fixtures import ADMIN_KEY
from tests.helpers import stop_process, wait_for
from tests.live import REPO, live_env


def test_metrics_add_up_across_api_worker_processes(tmp_path: Path, redis_url: str):
    env = live_env(tmp_path, redis_url)
    port = env["TUNERY_API_PORT"]
    log = open(tmp_path / "api.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "cli", "api", "--workers", "2"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{base}/readyz").status_code == 200, 60, "api with 2 workers", process)
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        for _ in range(40):
            # A new connection each time, so the kernel spreads them over both processes.
            with httpx.Client(base_url=base, headers=headers) as client:
                assert client.get("/v1/files").status_code == 200
        text = httpx.get(f"{base}/metrics").text
        samples = [
            s
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "tunery_http_request_duration_seconds_count" and s.labels["route"] == "/v1/files"
        ]
        assert sum(s.value for s in samples) == 40
        pids = {p.name for p in (Path(env["TUNERY_DATA_DIR"]) / "metrics" / "api").glob("histogram_*.db")}
        assert len(pids) == 2  # both processes recorded requests into the shared folder
    finally:
        stop_process(process)
        log.close()
