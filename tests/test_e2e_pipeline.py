"""End to end on real processes: upload → job → queued → running → succeeded, cancel, bad files.

The API, trainer and evaluator run as separate `tunery` processes on a Redis of the module's own and the
S3-compatible test server, and train the built-in tiny Llama on real chat data. One live Tunery serves the
module's tests (starting one takes seconds of imports): each test works on jobs of its own, and a service a
test stopped is started again before the next.
"""

from __future__ import annotations

import csv
import io
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis
from rq.job import Job
from rq.serializers import JSONSerializer

from shared.platform import storage_keys
from shared.platform.storage import S3Storage
from tests.api_fixtures import IDENTITY_CHAT, chat_lines
from tests.conftest import new_bucket, start_live
from tests.helpers import RedisProcess
from tests.live import LiveTunery

pytestmark = pytest.mark.slow
SERVICES = ("api", "trainer", "evaluator")


@pytest.fixture(scope="module")
def bucket_storage(s3_server) -> S3Storage:
    """The module's bucket, where its live Tunery publishes."""
    return new_bucket(s3_server)


@pytest.fixture(scope="module")
def shared_live(tmp_path_factory: pytest.TempPathFactory, s3_server, bucket_storage) -> Iterator[LiveTunery]:
    """One live Tunery for the module, on a Redis of its own: the per-test `redis_url` empties the
    session's Redis, which would pull the ground from under services that outlive a test."""
    folder = tmp_path_factory.mktemp("e2e-pipeline")
    (folder / "redis").mkdir()
    redis_server = RedisProcess(folder / "redis")
    redis_server.start()
    started: list[LiveTunery] = []
    try:
        yield start_live(folder, redis_server.url, s3_server, bucket_storage, None, started)
    finally:
        for tunery in started:
            tunery.stop()
        redis_server.stop()


@pytest.fixture
def live(shared_live: LiveTunery) -> LiveTunery:
    """The module's live Tunery with every service running."""
    shared_live.ensure_running(*SERVICES)
    return shared_live


def trainer_metrics(live: LiveTunery) -> dict[str, float]:
    """The trainer's own /metrics (summed over its forked work horses), by sample name."""
    scrape = httpx.get(f"http://127.0.0.1:{live.env['TUNERY_TRAINER_METRICS_PORT']}/metrics").text
    return {s.name: s.value for f in text_string_to_metric_families(scrape) for s in f.samples}


def upload(client, body: bytes, name: str = "train.jsonl") -> dict:
    response = client.post("/v1/files", files={"file": (name, body)}, data={"purpose": "fine-tune"})
    assert response.status_code == 200, response.text
    return response.json()


def test_a_job_trains_evaluates_and_publishes_a_working_adapter(live: LiveTunery, bucket_storage, tmp_path):
    counted = trainer_metrics(live)
    with live.client() as client:
        file = upload(client, IDENTITY_CHAT.read_bytes())
        assert file["status"] == "processed"
        method = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": 4}}}
        job = client.post(
            "/v1/fine_tuning/jobs",
            json={"model": "tunery/tiny-chat", "training_file": file["id"], "method": method, "seed": 3},
        ).json()
        assert job["status"] == "validating_files"
    job, seen = live.wait_for_job(job["id"], {"succeeded", "failed", "cancelled"})
    assert job["status"] == "succeeded", job["error"]
    assert seen[0] == "validating_files" and "running" in seen
    # What the estimate said before training is what training did.
    assert job["estimate"]["optimizer_steps"] == job["progress"]["total_steps"]
    assert job["estimate"]["trained_tokens"] == job["trained_tokens"]
    assert job["usage"]["device_seconds"] > 0 and job["usage"]["cost_usd"] > 0

    # The fine-tuned model beats the base model on held-out rows it never trained on.
    report = job["evaluation"]
    assert report["validation_source"] == "held_out_split"
    assert report["fine_tuned"]["loss"] < report["base"]["loss"]
    assert job["fine_tuned_model"] == f"ft:tunery/tiny-chat:{job['organization_id']}::{job['id']}"

    with live.client() as client:
        csv_text = client.get(f"/v1/files/{job['result_files'][0]}/content").text
        events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
        models = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert job["fine_tuned_model"] in models

    rows = list(csv.DictReader(io.StringIO(csv_text)))
    assert list(rows[0]) == [
        "step",
        "train_loss",
        "train_accuracy",
        "valid_loss",
        "valid_mean_token_accuracy",
    ]
    steps = job["progress"]["total_steps"]
    assert [int(r["step"]) for r in rows] == list(range(1, steps + 1))
    metric_steps = [e["data"]["step"] for e in events if e["type"] == "metrics"]
    assert max(metric_steps) == steps == len(rows)

    losses = [float(r["train_loss"]) for r in rows]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 * 0.8

    _assert_adapter_changes_the_model(job, bucket_storage, tmp_path)

    # The trainer's own /metrics counted the work (summed over its forked work horses): this job's, since
    # no other trained meanwhile.
    samples = trainer_metrics(live)
    tokens, step_count = "tunery_trained_tokens_total", "tunery_training_step_duration_seconds_count"
    assert samples[tokens] - counted.get(tokens, 0.0) == job["trained_tokens"] > 0
    assert samples[step_count] - counted.get(step_count, 0.0) == steps


def _assert_adapter_changes_the_model(job: dict, storage: S3Storage, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shared.ml.builtin_models import build_tiny_chat_model

    adapter = tmp_path / "adapter"
    storage.download_prefix(storage_keys.adapter_prefix(job["organization_id"], job["id"]), adapter)
    assert (adapter / "adapter_model.safetensors").exists()
    base_dir = build_tiny_chat_model(tmp_path / "base", arch="llama")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    inputs = tokenizer("<|im_start|>user\nWho are you?<|im_end|>\n", return_tensors="pt")
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        before = base(**inputs).logits
        tuned = PeftModel.from_pretrained(base, adapter)
        after = tuned(**inputs).logits
    assert (after - before).abs().max() > 1e-2


def test_cancelling_a_running_job_stops_training(live: LiveTunery, bucket_storage):
    with live.client() as client:
        file = upload(client, IDENTITY_CHAT.read_bytes())
        method = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 50, "batch_size": 1}}}
        job = live.start_training(
            {"model": "tunery/tiny-chat", "training_file": file["id"], "method": method}
        )
        cancelled = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").json()
        assert cancelled["status"] == "cancelled"

        def last_step() -> int:
            events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 1000}).json()
            return max((e["data"]["step"] for e in events["data"] if e["type"] == "metrics"), default=0)

        time.sleep(3)
        settled = last_step()
        time.sleep(2)
        assert last_step() == settled
        final = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    assert final["status"] == "cancelled"
    assert final["progress"]["step"] < final["progress"]["total_steps"]
    assert bucket_storage.list_keys(storage_keys.adapter_prefix(final["organization_id"], final["id"])) == []
    task = Job.fetch(
        f"{final['id']}-train-0",
        connection=Redis.from_url(live.env["TUNERY_REDIS_URL"]),
        serializer=JSONSerializer,
    )
    assert task.return_value() == "stopped"


def test_a_broken_upload_reports_its_line_numbers(live: LiveTunery):
    lines = chat_lines(12).splitlines(keepends=True)
    lines[4] = b"not json at all\n"
    lines[9] = b'{"messages": [{"role": "user", "content": "only a question"}]}\n'
    with live.client() as client:
        file = upload(client, b"".join(lines))
        assert file["status"] == "error"
        assert "line 5: invalid JSON" in file["status_details"]
        assert "line 10: no assistant message" in file["status_details"]
        refused = client.post(
            "/v1/fine_tuning/jobs", json={"model": "tunery/tiny-chat", "training_file": file["id"]}
        )
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "training_file"


def test_a_trainer_stopped_with_sigterm_requeues_its_job_and_another_finishes_it(live: LiveTunery):
    with live.client() as client:
        file = upload(client, IDENTITY_CHAT.read_bytes())
        method = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 4, "batch_size": 1}}}
        job = live.start_training(
            {"model": "tunery/tiny-chat", "training_file": file["id"], "method": method}
        )
        trainer = live.processes["trainer"]
        trainer.send_signal(signal.SIGTERM)
        assert trainer.wait(timeout=60) == 0
        requeued = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
        assert requeued["status"] == "queued"
        assert requeued["attempt"] == 1
    live.start("trainer")
    final, _ = live.wait_for_job(job["id"], {"succeeded", "failed", "cancelled"})
    assert final["status"] == "succeeded", final["error"]
    with live.client() as client:
        events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
    assert any("returned to the queue" in e["message"] for e in events)


def test_a_second_architecture_trains_too(live: LiveTunery):
    with live.client() as client:
        file = upload(client, IDENTITY_CHAT.read_bytes())
        job = client.post(
            "/v1/fine_tuning/jobs",
            json={
                "model": "tunery/tiny-chat-qwen2",
                "training_file": file["id"],
                "hyperparameters": {"n_epochs": 2},
            },
        ).json()
    final, _ = live.wait_for_job(job["id"], {"succeeded", "failed", "cancelled"})
    assert final["status"] == "succeeded", final["error"]
    assert final["evaluation"]["fine_tuned"]["loss"] < final["evaluation"]["base"]["loss"]


def test_a_model_that_cannot_be_loaded_fails_the_job_with_an_actionable_error(live: LiveTunery):
    with live.client() as client:
        file = upload(client, IDENTITY_CHAT.read_bytes())
        job = client.post(
            "/v1/fine_tuning/jobs", json={"model": "missing-weights", "training_file": file["id"]}
        ).json()
    final, _ = live.wait_for_job(job["id"], {"succeeded", "failed", "cancelled"})
    assert final["status"] == "failed"
    assert final["error"]["code"] == "model_unavailable"
    assert "no config.json" in final["error"]["message"]
    assert final["finished_at"] is not None


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def test_a_killed_training_process_is_retried_as_a_new_attempt_and_finishes(live: LiveTunery):
    with live.client() as client:
        file = upload(client, IDENTITY_CHAT.read_bytes())
        method = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": 1}}}
        job = live.start_training(
            {"model": "tunery/tiny-chat", "training_file": file["id"], "method": method}
        )
        (horse,) = _children(live.processes["trainer"].pid)
        os.kill(horse, signal.SIGKILL)
    final, _ = live.wait_for_job(job["id"], {"succeeded", "failed", "cancelled"})
    assert final["status"] == "succeeded", final["error"]
    assert final["attempt"] == 1
    with live.client() as client:
        events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
    assert any(
        "The training process died (signal 9); retrying as attempt 2; 1 of the job's 3 allowed failures used"
        in e["message"]
        for e in events
    )


def test_a_lost_trainer_is_noticed_without_it_and_its_job_finishes_elsewhere(live: LiveTunery):
    with live.client() as client:
        file = upload(client, IDENTITY_CHAT.read_bytes())
        method = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": 1}}}
        job = live.start_training(
            {"model": "tunery/tiny-chat", "training_file": file["id"], "method": method}
        )
        # The whole pod is gone: the worker and its work horse, with no peer on the queue.
        trainer = live.processes["trainer"]
        (horse,) = _children(trainer.pid)
        os.kill(horse, signal.SIGKILL)
        trainer.kill()
        trainer.wait()
        deadline = time.monotonic() + 60
        while (current := client.get(f"/v1/fine_tuning/jobs/{job['id']}").json())["attempt"] == 0:
            assert time.monotonic() < deadline, "the janitor did not notice the lost worker"
            time.sleep(0.5)
        assert current["status"] == "queued"
    live.start("trainer")
    final, _ = live.wait_for_job(job["id"], {"succeeded", "failed", "cancelled"})
    assert final["status"] == "succeeded", final["error"]
    with live.client() as client:
        events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
    assert any("worker lost: no heartbeat" in e["message"] for e in events)
