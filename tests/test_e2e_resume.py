"""End to end: a job whose trainer is stopped or killed carries on from its last full-state checkpoint
on the next attempt, and its loss at every step is the one an uninterrupted run of the same seed has."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.api_fixtures import IDENTITY_CHAT
from tests.live import LiveTunery

pytestmark = pytest.mark.slow

SEED = 1234
METHOD = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 1}}}
TRAINING_ROWS = b"".join(IDENTITY_CHAT.read_bytes().splitlines(keepends=True)[:40])  # 36 train: 72 steps


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _job_body(file_id: str, **extra: object) -> dict:
    return {"model": "tunery/tiny-chat", "training_file": file_id, "seed": SEED, "method": METHOD, **extra}


def _train_losses(live: LiveTunery, job_id: str) -> dict[int, float]:
    with live.client() as client:
        rows = client.get(f"/v1/fine_tuning/jobs/{job_id}/metrics").json()["data"]
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == len({r["step"] for r in train}), "a step is listed twice"
    return {r["step"]: r["train_loss"] for r in train}


def _events(live: LiveTunery, job_id: str) -> list[str]:
    with live.client() as client:
        data = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    return [e["message"] for e in data]


def _uninterrupted(live: LiveTunery, file_id: str) -> tuple[dict, dict[int, float]]:
    with live.client() as client:
        job = client.post("/v1/fine_tuning/jobs", json=_job_body(file_id)).json()
    final, _ = live.wait_for_job(job["id"], {"succeeded", "failed", "cancelled"})
    assert final["status"] == "succeeded", final["error"]
    return final, _train_losses(live, job["id"])


def _assert_same_curve(resumed: dict[int, float], reference: dict[int, float]) -> None:
    assert sorted(resumed) == sorted(reference)
    for step, loss in reference.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-4, abs=1e-5), f"step {step}"


def test_sigterm_saves_a_checkpoint_and_the_next_attempt_carries_on_from_it(live: LiveTunery):
    with live.client() as client:
        file_id = client.post(
            "/v1/files",
            files={"file": ("train.jsonl", TRAINING_ROWS)},
            data={"purpose": "fine-tune"},
        ).json()["id"]
    reference, reference_losses = _uninterrupted(live, file_id)

    job = live.start_training(_job_body(file_id))
    trainer = live.processes["trainer"]
    trainer.send_signal(signal.SIGTERM)
    assert trainer.wait(timeout=60) == 0
    with live.client() as client:
        requeued = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
        checkpoints = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
    saved_at = requeued["resume_checkpoint"]["step"]
    assert requeued["status"] == "queued" and requeued["attempt"] == 1
    assert 3 <= saved_at < reference["progress"]["total_steps"]
    assert checkpoints[0]["step_number"] == saved_at and checkpoints[0]["resumable"] is True

    live.start("trainer")
    final, _ = live.wait_for_job(job["id"], {"succeeded", "failed", "cancelled"})
    assert final["status"] == "succeeded", final["error"]
    assert final["progress"]["step"] == reference["progress"]["step"]
    events = _events(live, job["id"])
    assert any(f"Resuming from checkpoint {checkpoints[0]['id']} at step {saved_at}" in m for m in events)
    _assert_same_curve(_train_losses(live, job["id"]), reference_losses)


def test_a_killed_training_process_resumes_from_its_last_periodic_checkpoint(live: LiveTunery):
    with live.client() as client:
        file_id = client.post(
            "/v1/files",
            files={"file": ("train.jsonl", TRAINING_ROWS)},
            data={"purpose": "fine-tune"},
        ).json()["id"]
    reference, reference_losses = _uninterrupted(live, file_id)

    job = live.start_training(_job_body(file_id, checkpoint_every_steps=2))
    with live.client() as client:
        deadline = time.monotonic() + 60
        while client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["resume_checkpoint"] is None:
            assert time.monotonic() < deadline, live.log_tail("trainer")
            time.sleep(0.05)
    (horse,) = _children(live.processes["trainer"].pid)
    os.kill(horse, signal.SIGKILL)
    final, _ = live.wait_for_job(job["id"], {"succeeded", "failed", "cancelled"})
    assert final["status"] == "succeeded", final["error"]
    assert final["attempt"] == 1
    assert final["progress"]["step"] == reference["progress"]["step"]
    events = _events(live, job["id"])
    assert any("The training process died (signal 9)" in m for m in events)
    resumed = [m for m in events if m.startswith("Resuming from checkpoint")]
    assert len(resumed) == 1 and "(saved by attempt 1)" in resumed[0]
    _assert_same_curve(_train_losses(live, job["id"]), reference_losses)
    with live.client() as client:
        listed = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints", params={"limit": 100}).json()[
            "data"
        ]
    assert sum(1 for c in listed if c.get("resumable")) <= 2  # pruned to TUNERY_CHECKPOINT_KEEP
