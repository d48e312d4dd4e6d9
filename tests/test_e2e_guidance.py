"""Guidance, progress and cost on a live Tunery: estimates against real runs, budgets, live events."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.api_fixtures import ADMIN_KEY, IDENTITY_CHAT
from tests.live import REPO, LiveTunery

pytestmark = pytest.mark.slow

FINISHED = {"succeeded", "failed", "cancelled"}


def upload(client) -> str:
    file = client.post(
        "/v1/files",
        files={"file": ("identity.jsonl", IDENTITY_CHAT.read_bytes())},
        data={"purpose": "fine-tune"},
    ).json()
    return file["id"]


def test_the_estimate_matches_the_run_and_calibration_brings_the_duration_close(live: LiveTunery):
    with live.client() as client:
        body = {
            "model": "tunery/tiny-chat",
            "training_file": upload(client),
            "seed": 5,
            "method": {
                "type": "supervised",
                "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 2}},
            },
        }
        before = client.post("/v1/fine_tuning/jobs/estimate", json=body)
        assert before.status_code == 200, before.text
        before = before.json()
        assert set(before["hyperparameters"]["reasons"]) >= {
            "max_seq_length",
            "micro_batch_size",
            "scheduler",
        }
        assert before["estimate"]["gpu_classes"]["cpu"]["speed"].startswith("20% of the class's peak")
        job = client.post("/v1/fine_tuning/jobs", json=body).json()
    done, _ = live.wait_for_job(job["id"], FINISHED)
    assert done["status"] == "succeeded", done["error"]
    assert before["estimate"]["trained_tokens"] == done["trained_tokens"]
    assert before["estimate"]["optimizer_steps"] == done["progress"]["total_steps"]

    with live.client() as client:
        after = client.post("/v1/fine_tuning/jobs/estimate", json=body).json()
        usage = client.get("/v1/usage").json()
        series = client.get(f"/v1/fine_tuning/jobs/{job['id']}/metrics").json()["data"]
    cpu = after["estimate"]["gpu_classes"]["cpu"]
    assert cpu["speed"] == "measured on earlier jobs of this class"
    # Calibrated on this very job: the estimate lands within 2× of the device-seconds it used.
    assert done["usage"]["device_seconds"] / 2 < cpu["duration_seconds"] < done["usage"]["device_seconds"] * 2
    assert usage["cost_usd"] == pytest.approx(done["usage"]["cost_usd"])
    assert [r["step"] for r in series if r["kind"] == "train"] == list(
        range(1, done["progress"]["total_steps"] + 1)
    )
    assert len([r for r in series if r["kind"] == "validation"]) == 2


@pytest.mark.parametrize(
    ("budget", "reason"),
    [
        ({"max_duration_seconds": 2}, "max_duration_seconds (2 s) reached"),
        ({"max_cost_usd": 0.00005}, "max_cost_usd"),
    ],
)
def test_a_budget_stops_training_keeps_the_adapter_and_fails_the_job_clearly(
    live: LiveTunery, budget, reason
):
    with live.client() as client:
        job = client.post(
            "/v1/fine_tuning/jobs",
            json={"model": "tunery/tiny-chat", "training_file": upload(client), "hyperparameters": {"n_epochs": 50},
                  **budget},
        ).json()  # fmt: skip
        done, _ = live.wait_for_job(job["id"], FINISHED)
        checkpoints = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
    assert done["status"] == "failed"
    assert done["error"]["code"] == "budget_exceeded"
    assert reason in done["error"]["message"]
    assert 0 < done["progress"]["step"] < done["progress"]["total_steps"]
    assert [c["step_number"] for c in checkpoints] == [done["progress"]["step"]]
    if "max_cost_usd" in budget:
        # Stopped within one optimizer step of crossing the budget.
        assert done["usage"]["cost_usd"] == pytest.approx(budget["max_cost_usd"], rel=0.5)


def test_events_stream_live_as_server_sent_events(live: LiveTunery):
    with live.client() as client:
        job = client.post(
            "/v1/fine_tuning/jobs",
            json={
                "model": "tunery/tiny-chat",
                "training_file": upload(client),
                "hyperparameters": {"n_epochs": 1},
            },
        ).json()
    received, ended = [], None
    url = f"/v1/fine_tuning/jobs/{job['id']}/events"
    with (
        httpx.Client(base_url=live.base_url, headers=live.client().headers, timeout=120) as http,
        http.stream("GET", url, params={"stream": "true"}) as stream,
    ):
        assert stream.headers["content-type"].startswith("text/event-stream")
        event_name = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                event_name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = json.loads(line.removeprefix("data: "))
                if event_name == "end":
                    ended = data
                    break
                received.append(data)
    assert ended == {"status": "succeeded"}
    assert received[0]["message"].startswith("Created fine-tuning job")
    assert received[-1]["message"].startswith("Job succeeded")
    assert any(e["type"] == "metrics" for e in received)
    order = [tuple(int(p) for p in e["id"].removeprefix("ftevent-").split("-")) for e in received]
    assert order == sorted(set(order))  # each event once, oldest first

    scrape = httpx.get(f"http://127.0.0.1:{live.env['TUNERY_TRAINER_METRICS_PORT']}/metrics").text
    costs = [
        s
        for f in text_string_to_metric_families(scrape)
        for s in f.samples
        if s.name == "tunery_cost_usd_total"
    ]
    assert costs and costs[0].labels == {"tenant": "org-default", "gpu_class": "cpu"} and costs[0].value > 0


def test_tunery_logs_follows_a_job_to_its_end_and_status_lists_it(live: LiveTunery):
    with live.client() as client:
        job = client.post(
            "/v1/fine_tuning/jobs",
            json={
                "model": "tunery/tiny-chat",
                "training_file": upload(client),
                "hyperparameters": {"n_epochs": 1},
            },
        ).json()
    env = live.env | {"TUNERY_API_KEY": ADMIN_KEY, "COLUMNS": "200"}
    followed = subprocess.run(
        [sys.executable, "-m", "cli", "logs", "-f", job["id"]], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert followed.returncode == 0, followed.stderr
    assert "Training started" in followed.stdout
    assert f"job {job['id']}: succeeded" in followed.stdout
    status = subprocess.run(
        [sys.executable, "-m", "cli", "status"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert status.returncode == 0, status.stderr
    assert job["id"] in status.stdout and "succeeded" in status.stdout


def test_a_learning_rate_sweep_tries_each_rate_and_trains_with_the_best(live: LiveTunery):
    with live.client() as client:
        job = client.post(
            "/v1/fine_tuning/jobs",
            json={
                "model": "tunery/tiny-chat", "training_file": upload(client), "hyperparameters": {"n_epochs": 2},
                "learning_rate_sweep": {"multipliers": [0.001, 1.0], "trial_fraction": 0.25},
            },
        ).json()  # fmt: skip
    done, _ = live.wait_for_job(job["id"], FINISHED)
    assert done["status"] == "succeeded", done["error"]
    trials = done["sweep_results"]
    assert [t["learning_rate_multiplier"] for t in trials] == [0.001, 1.0]
    # A thousandth of the rate barely moves the loss; the full rate wins and trains the job.
    assert trials[1]["valid_loss"] < trials[0]["valid_loss"]
    assert done["hyperparameters"]["learning_rate_multiplier"] == 1.0
    assert done["hyperparameter_reasons"]["learning_rate_multiplier"].startswith(
        "sweep: lowest validation loss"
    )
    assert done["progress"]["step"] == done["progress"]["total_steps"]


def test_a_files_report_counts_its_tokens_with_a_chosen_models_tokenizer(live: LiveTunery):
    with live.client() as client:
        file_id = upload(client)
        plain = client.get(f"/v1/files/{file_id}/report").json()
        report = client.get(
            f"/v1/files/{file_id}/report", params={"model": "tunery/tiny-chat", "max_seq_length": 128}
        ).json()
    assert plain["suggested_split"] == {
        "train": 82,
        "validation": 9,
        "rule": "10% held out, at least 1, at most 1,000",
    }
    assert "tokens" not in plain
    tokens = report["tokens"]
    assert 0 < tokens["p50"] <= tokens["p95"] <= tokens["max"]
    # Byte-level tokens: the Chinese rows (3 bytes a character) run past 128 tokens.
    assert 0 < tokens["truncated_examples"] < 91
    assert report["stats"]["exact_duplicates"] >= 0


def test_a_packed_job_trains_exactly_what_its_estimate_said(live: LiveTunery):
    with live.client() as client:
        job = client.post(
            "/v1/fine_tuning/jobs",
            json={"model": "tunery/tiny-chat", "training_file": upload(client),
                  "hyperparameters": {"n_epochs": 1, "batch_size": 2, "packing": True}},
        ).json()  # fmt: skip
    done, _ = live.wait_for_job(job["id"], FINISHED)
    assert done["status"] == "succeeded", done["error"]
    assert done["resolved_hyperparameters"]["packing"] is True
    assert done["estimate"]["optimizer_steps"] == done["progress"]["total_steps"]
    assert done["estimate"]["trained_tokens"] == done["trained_tokens"]
    # 82 examples in rows of the job's sequence length: far fewer steps than 41 padded batches of 2.
    assert done["progress"]["total_steps"] < 41
