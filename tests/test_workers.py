"""Worker processes: which queues they serve, and the metrics they expose from the start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families
from rq import Worker

from tests.helpers import port_open, stop_process, wait_for
from tests.live import REPO, live_env


def test_an_evaluator_can_serve_data_preparation_alone(tmp_path: Path, redis_url: str):
    env = live_env(tmp_path, redis_url)
    port = int(env["TUNERY_EVALUATOR_METRICS_PORT"])
    process = subprocess.Popen(
        [sys.executable, "-m", "cli", "evaluator", "--queue", "prepare"], cwd=REPO, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        connection = redis.Redis.from_url(redis_url)
        wait_for(lambda: port_open(port) and Worker.all(connection=connection), 60, "evaluator", process)
        (worker,) = Worker.all(connection=connection)
        assert worker.queue_names() == ["prepare"]
        samples = {
            (s.labels["service"], s.labels["outcome"]): s.value
            for family in text_string_to_metric_families(httpx.get(f"http://127.0.0.1:{port}/metrics").text)
            for s in family.samples
            if s.name == "tunery_worker_tasks_total"
        }
        assert samples[("prepare", "failed")] == 0 and samples[("evaluator", "failed")] == 0
    finally:
        stop_process(process)


def test_an_unknown_queue_is_refused(tmp_path: Path, redis_url: str):
    refused = subprocess.run(
        [sys.executable, "-m", "cli", "evaluator", "--queue", "train:cpu"], cwd=REPO, env=live_env(tmp_path, redis_url),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 2
    assert "unknown queue 'train:cpu'; choose from prepare, eval" in refused.stderr
