"""The official openai SDK, unchanged and in strict validation mode, against a live Tunery.

Every response below is validated by the SDK against its own types
(`_strict_response_validation=True`): a missing key or a status outside OpenAI's values fails.
"""

from __future__ import annotations

import time

import openai
import pytest
from openai import OpenAI

from tests.api_fixtures import ADMIN_KEY, IDENTITY_CHAT, chat_lines
from tests.live import LiveTunery

pytestmark = pytest.mark.slow

FINISHED = {"succeeded", "failed", "cancelled"}


@pytest.fixture
def sdk(live: LiveTunery) -> OpenAI:
    return OpenAI(base_url=f"{live.base_url}/v1", api_key=ADMIN_KEY, _strict_response_validation=True)


def wait(sdk: OpenAI, job_id: str, until, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while True:
        job = sdk.fine_tuning.jobs.retrieve(job_id)
        if until(job):
            return job
        assert time.monotonic() < deadline, f"job {job_id} stuck in {job.status}"
        time.sleep(0.2)


def training_file(sdk: OpenAI):
    with IDENTITY_CHAT.open("rb") as f:
        file = sdk.files.create(file=f, purpose="fine-tune")
    return sdk.files.wait_for_processing(file.id, poll_interval=0.2)


def test_a_full_job_through_the_sdk(sdk: OpenAI):
    file = training_file(sdk)
    assert file.status == "processed"
    job = sdk.fine_tuning.jobs.create(
        model="tunery/tiny-chat",
        training_file=file.id,
        suffix="sdk",
        seed=11,
        metadata={"run": "sdk-test"},
        method={
            "type": "supervised",
            "supervised": {
                "hyperparameters": {"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": "auto"}
            },
        },
        extra_body={"lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
    )
    assert job.status == "validating_files"
    assert job.model_extra["lora"]["r"] == 4
    done = wait(sdk, job.id, lambda j: j.status in FINISHED)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:tunery/tiny-chat:org-default:sdk:{job.id}"
    assert done.trained_tokens > 0

    events = list(sdk.fine_tuning.jobs.list_events(job.id, limit=5))  # auto-paging across pages
    assert events[-1].message.startswith("Created fine-tuning job")
    assert any(e.type == "metrics" for e in events)

    checkpoints = sdk.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [done.model_extra["progress"]["total_steps"]]
    assert checkpoints[0].fine_tuned_model_checkpoint.startswith(done.fine_tuned_model)

    assert done.fine_tuned_model in [m.id for m in sdk.models.list()]
    assert sdk.models.retrieve(done.fine_tuned_model).owned_by == "org-default"
    results = sdk.files.content(done.result_files[0]).text
    assert results.startswith("step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy")
    assert [j.id for j in sdk.fine_tuning.jobs.list(metadata={"run": "sdk-test"})] == [job.id]

    assert sdk.models.delete(done.fine_tuned_model).deleted is True
    assert done.fine_tuned_model not in [m.id for m in sdk.models.list()]


def test_auto_and_explicit_hyperparameters_and_list_pagination(sdk: OpenAI):
    file = training_file(sdk)
    auto = sdk.fine_tuning.jobs.create(model="tunery/tiny-chat", training_file=file.id)
    explicit = sdk.fine_tuning.jobs.create(
        model="tunery/tiny-chat",
        training_file=file.id,
        hyperparameters={"n_epochs": 1, "batch_size": 8, "learning_rate_multiplier": 0.5},
    )
    third = sdk.fine_tuning.jobs.create(model="tunery/tiny-chat", training_file=file.id)
    assert auto.hyperparameters.n_epochs == "auto"  # resolved once the files are validated
    auto, explicit = (wait(sdk, j.id, lambda j: j.status != "validating_files") for j in (auto, explicit))
    for job in (auto, explicit, third):
        sdk.fine_tuning.jobs.cancel(job.id)
    assert auto.hyperparameters.n_epochs == 3  # 82 training rows: the heuristic keeps 3 epochs
    assert auto.model_extra["hyperparameter_reasons"]["n_epochs"].startswith("auto")
    assert (explicit.hyperparameters.batch_size, explicit.hyperparameters.learning_rate_multiplier) == (
        8,
        0.5,
    )

    first_page = sdk.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in first_page.data] == [third.id, explicit.id]
    assert first_page.has_more
    assert [j.id for j in sdk.fine_tuning.jobs.list(limit=2)] == [third.id, explicit.id, auto.id]
    assert all(j.status == "cancelled" for j in sdk.fine_tuning.jobs.list(limit=2))


def test_pause_and_resume_a_running_job(sdk: OpenAI, live: LiveTunery):
    file = training_file(sdk)
    job = sdk.fine_tuning.jobs.create(
        model="tunery/tiny-chat", training_file=file.id, hyperparameters={"n_epochs": 30, "batch_size": 1}
    )
    wait(sdk, job.id, lambda j: j.model_extra["progress"]["step"] >= 2)
    paused = sdk.fine_tuning.jobs.pause(job.id)
    assert (paused.status, paused.model_extra["stage"]) == ("queued", "paused")
    time.sleep(2)
    steps = sdk.fine_tuning.jobs.retrieve(job.id).model_extra["progress"]["step"]
    time.sleep(1.5)
    assert sdk.fine_tuning.jobs.retrieve(job.id).model_extra["progress"]["step"] == steps  # training stopped
    resumed = sdk.fine_tuning.jobs.resume(job.id)
    assert (resumed.status, resumed.model_extra["stage"]) == ("queued", "queued")
    wait(sdk, job.id, lambda j: j.status == "running")
    cancelled = sdk.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"


def test_sdk_errors_map_to_the_right_exceptions(sdk: OpenAI, live: LiveTunery):
    with pytest.raises(openai.NotFoundError):
        sdk.fine_tuning.jobs.retrieve("ftjob-missing")
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=f"{live.base_url}/v1", api_key="tun_wrong").files.list()
    bad = sdk.files.create(file=("bad.jsonl", chat_lines(3)), purpose="fine-tune")
    assert sdk.files.wait_for_processing(bad.id, poll_interval=0.2).status == "error"
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.fine_tuning.jobs.create(model="tunery/tiny-chat", training_file=bad.id)
    assert refused.value.param == "training_file"
    good = training_file(sdk)
    job = sdk.fine_tuning.jobs.create(model="tunery/tiny-chat", training_file=good.id)
    sdk.fine_tuning.jobs.cancel(job.id)
    with pytest.raises(openai.BadRequestError):  # not a 409: the SDK would retry that
        sdk.fine_tuning.jobs.cancel(job.id)


def test_a_large_file_through_the_uploads_api(sdk: OpenAI):
    upload = sdk.uploads.upload_file_chunked(
        file=IDENTITY_CHAT, mime_type="text/jsonl", purpose="fine-tune", part_size=6000
    )
    assert upload.status == "completed"
    assert upload.file.status == "processed"
    assert sdk.files.content(upload.file.id).content == IDENTITY_CHAT.read_bytes()
    files = [f.id for f in sdk.files.list(purpose="fine-tune")]
    assert upload.file.id in files
    assert sdk.files.delete(upload.file.id).deleted is True
