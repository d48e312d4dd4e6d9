"""Publishing to a Hugging Face Hub: refused up front without a token; a push that cannot reach the Hub
leaves the job succeeded and says why."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from services.evaluator.task import _publish_to_hub
from shared.platform import storage_keys
from shared.platform.hub import push_to_hub
from shared.platform.job_states import JobState
from shared.platform.job_store import JobStore
from shared.platform.settings import Settings
from shared.platform.storage import LocalStorage
from tests.helpers import free_port
from tests.test_job_store import job_record


def _unreachable_hub(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, hf_token="hf_test", hf_endpoint=f"http://127.0.0.1:{free_port()}")


def test_a_push_to_an_unreachable_hub_raises(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "storage")
    record = job_record().model_copy(update={"hub_repo": "acme/tiny"})
    storage.put_bytes(storage_keys.artifacts_prefix(record.tenant, record.id) + "README.md", b"# card")
    with pytest.raises(Exception, match="Connection refused"):
        push_to_hub(_unreachable_hub(tmp_path), storage, record)


def test_a_failed_push_is_an_event_and_the_job_stays_succeeded(redis_url: str, tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "storage")
    jobs = JobStore(redis.Redis.from_url(redis_url), storage)
    record = job_record(state=JobState.SUCCEEDED).model_copy(update={"hub_repo": "acme/tiny"})
    jobs.create(record, "created")
    _publish_to_hub(jobs, storage, _unreachable_hub(tmp_path), record)
    assert jobs.require(record.id).state is JobState.SUCCEEDED
    assert "hub" not in jobs.require(record.id).artifacts
    last = jobs.all_events(record.id)[-1]
    assert last["level"] == "warn" and "acme/tiny failed" in last["message"]


def test_a_job_asking_for_a_hub_repo_without_a_server_token_is_refused(api) -> None:
    file_id = api.post(
        "/v1/files",
        files={
            "file": (
                "t.jsonl",
                b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n',
            )
        },
        data={"purpose": "fine-tune"},
    ).json()["id"]
    response = api.post(
        "/v1/fine_tuning/jobs",
        json={"model": "tunery/tiny-chat", "training_file": file_id, "hub_repo": "acme/tiny"},
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "hub_repo"
