"""Faults of the platform with real processes: a worker SIGKILLed mid-job, Redis killed and brought back.
Every job still ends exactly once, and a healthy job does not pay for the platform's faults."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.api_fixtures import IDENTITY_CHAT
from tests.helpers import RedisProcess, port_open, wait_for
from tests.live import LiveTunery

pytestmark = pytest.mark.slow

FINAL = {"succeeded", "failed", "cancelled"}
ROWS = IDENTITY_CHAT.read_bytes().splitlines(keepends=True)
# Checkpoints often, and a short stop grace, so that recoveries take seconds here.
FAST_RECOVERY = {"TUNERY_CHECKPOINT_EVERY_STEPS": "3", "TUNERY_STOP_GRACE_SECONDS": "20"}


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A Redis to kill (ask for it before `live_factory`, so that the services stop before it does)."""
    directory = tmp_path / "own-redis"
    directory.mkdir()
    server = RedisProcess(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _gone(pid: int) -> bool:
    """Exited (a zombie waiting for its reaper counts as exited)."""
    try:
        return "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True


def _upload(live: LiveTunery, rows: list[bytes]) -> str:
    with live.client() as client:
        created = client.post(
            "/v1/files", files={"file": ("train.jsonl", b"".join(rows))}, data={"purpose": "fine-tune"}
        )
    assert created.status_code == 200, created.text
    return created.json()["id"]


def _create(live: LiveTunery, file_id: str, epochs: int, batch_size: int = 1, **extra: object) -> str:
    method = {
        "type": "supervised",
        "supervised": {"hyperparameters": {"n_epochs": epochs, "batch_size": batch_size}},
    }
    body = {"model": "tunery/tiny-chat", "training_file": file_id, "seed": 3, "method": method, **extra}
    with live.client() as client:
        created = client.post("/v1/fine_tuning/jobs", json=body)
    assert created.status_code == 200, created.text
    return created.json()["id"]


def _events(live: LiveTunery, job_id: str) -> list[str]:
    with live.client() as client:
        data = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    return [e["message"] for e in data]


def _wait_stage(live: LiveTunery, job_id: str, stage: str, timeout: float = 180) -> dict:
    """Poll until the job's exact state (`stage`: evaluating shows as status running) is `stage`."""
    with live.client() as client:
        deadline = time.monotonic() + timeout
        while (job := client.get(f"/v1/fine_tuning/jobs/{job_id}").json())["stage"] != stage:
            assert job["status"] not in FINAL, job
            assert time.monotonic() < deadline, f"{job_id} still {job['stage']}"
            time.sleep(0.2)  # within the API's rate limit
    return job


def _ended_once(live: LiveTunery, job_id: str) -> dict:
    """The job's final record, after checking that it succeeded with exactly one ending in its event log and
    no training step recorded twice."""
    final, _ = live.wait_for_job(job_id, FINAL, timeout=600)
    assert final["status"] == "succeeded", final["error"]
    endings = [m for m in _events(live, job_id) if m.startswith("Job succeeded")]
    assert len(endings) == 1, endings
    with live.client() as client:
        rows = client.get(f"/v1/fine_tuning/jobs/{job_id}/metrics").json()["data"]
    steps = [row["step"] for row in rows if row["kind"] == "train"]
    assert len(steps) == len(set(steps)) == final["progress"]["step"]
    return final


def test_a_sigkilled_trainer_leaves_no_work_horse_and_its_job_resumes_from_a_checkpoint(
    live_factory, redis_url: str
) -> None:
    live = live_factory(redis_url, FAST_RECOVERY)
    job_id = _create(live, _upload(live, ROWS[:20]), epochs=2)
    _wait_stage(live, job_id, "running")
    with live.client() as client:
        deadline = time.monotonic() + 120
        while client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["resume_checkpoint"] is None:
            assert time.monotonic() < deadline, live.log_tail("trainer")
            time.sleep(0.2)
    trainer = live.processes["trainer"]
    (horse,) = _children(trainer.pid)
    trainer.kill()
    trainer.wait()
    # The horse gave the metrics port up at once, and stops by itself: checkpoint, job back in its queue.
    assert not port_open(int(live.env["TUNERY_TRAINER_METRICS_PORT"]))
    wait_for(lambda: _gone(horse), 30, "the orphaned work horse to stop")
    _wait_stage(live, job_id, "queued", timeout=30)
    live.start("trainer")
    _ended_once(live, job_id)
    events = _events(live, job_id)
    assert any(m.startswith("Resuming from checkpoint") for m in events), events
    assert not any("allowed failures used" in m for m in events), (
        "a platform fault was counted against the job"
    )


def test_a_sigkilled_evaluator_mid_evaluation_evaluates_again_and_the_job_succeeds(
    live_factory, redis_url: str
) -> None:
    live = live_factory(redis_url, FAST_RECOVERY)
    # Every row held out: an evaluation long enough to be caught in the middle.
    validation = _upload(live, ROWS[:40])
    job_id = _create(live, _upload(live, ROWS[:24]), epochs=1, batch_size=4, validation_file=validation)
    _wait_stage(live, job_id, "evaluating")
    evaluator = live.processes["evaluator"]
    wait_for(lambda: _children(evaluator.pid), 30, "the evaluation's work horse")
    evaluator.kill()
    evaluator.wait()
    live.start("evaluator")
    assert _ended_once(live, job_id)["evaluation"] is not None


def test_jobs_in_every_stage_end_exactly_once_through_a_redis_outage_longer_than_a_lost_worker_is_given(
    own_redis: RedisProcess, live_factory
) -> None:
    """Redis is SIGKILLed while one job is evaluated, one trains and one is being prepared, for longer
    than a silent worker is given before it counts as lost (no worker can heartbeat meanwhile); it comes back
    from its append-only file, and every job succeeds, none twice, no service lost."""
    live = live_factory(own_redis.url, FAST_RECOVERY)
    outage = float(live.env["TUNERY_WORKER_LOST_AFTER_SECONDS"]) + 5
    file_id = _upload(live, ROWS[:20])
    # Held-out rows enough for an evaluation that lasts while the next job trains.
    validation = _upload(live, ROWS[:40])
    jobs = [_create(live, file_id, epochs=1, batch_size=8, validation_file=validation)]
    _wait_stage(live, jobs[0], "evaluating")
    jobs.append(_create(live, file_id, epochs=3, batch_size=1))
    _wait_stage(live, jobs[1], "running")
    jobs.append(_create(live, file_id, epochs=1, batch_size=8))
    own_redis.kill()
    time.sleep(outage)  # the outage itself
    own_redis.start()
    for job_id in jobs:
        _ended_once(live, job_id)
    for process in live.processes.values():
        assert process.poll() is None, "a service died with Redis"


def test_twenty_queued_jobs_all_succeed_once_through_a_redis_restart_during_an_evaluation(
    own_redis: RedisProcess, live_factory
) -> None:
    live = live_factory(own_redis.url, {"TUNERY_MAX_ACTIVE_JOBS_PER_TENANT": "20"})
    file_id = _upload(live, ROWS[:12])
    jobs = [_create(live, file_id, epochs=1, batch_size=8) for _ in range(20)]
    _wait_stage(live, jobs[0], "evaluating")
    own_redis.kill()
    own_redis.start()
    for job_id in jobs:
        _ended_once(live, job_id)
