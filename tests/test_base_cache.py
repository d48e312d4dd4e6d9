"""The base-results cache of chat evaluations (services/evaluator/base_cache.py): a later job on the same
base model, validation rows and settings reads the base model's side from storage instead of computing it
again, gets the same report, and any change to those inputs, or an entry that cannot be trusted, makes the
evaluation compute it afresh. The tiny built-in model with a random LoRA adapter; held-out splits in local
storage."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import torch

from services.evaluator.cancellation import CancelWatch, EvaluationCancelled
from services.evaluator.task import GENERATION_ROWS, evaluate, evaluate_base_model, generation_plan
from shared.data.formats import Example
from shared.ml.model_loading import default_device
from shared.ml.task_data import split_jsonl
from shared.platform import storage_keys
from shared.platform.cpus import usable_cpus
from shared.platform.file_store import FileStore
from shared.platform.ids import new_file_id, new_job_id
from shared.platform.job_states import JobState
from shared.platform.job_store import JobStore
from shared.platform.records import FileRecord, Hyperparameters, JobRecord, LoraSettings, now
from shared.platform.settings import Settings
from shared.platform.storage import LocalStorage

TENANT = "org-cache"
MODEL = "tunery/tiny-chat"
CACHE = storage_keys.tenant_prefix(TENANT) + "cache/base-evaluations/"


def _chat(question: str, answer: str, group: str) -> Example:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return Example(kind="chat", source="line 1", messages=messages, fields={"group": group})


ROWS = [
    _chat("Who are you?", "I am Tunery.", "en"),
    _chat("Qui es-tu ?", "Je suis Tunery.", "fr"),
    _chat("Hello", "Hi!", "en"),
]


@pytest.fixture(scope="module")
def weights(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random (untrained) LoRA adapter and the tokenizer, as the trainer publishes them."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from shared.ml.materialize import materialize
    from shared.ml.model_loading import load_causal_lm
    from shared.planning.catalog import load_catalog

    settings = Settings(model_cache_dir=model_cache, model_catalog=None)
    base_dir = materialize(load_catalog(settings)[MODEL], settings)
    out = tmp_path_factory.mktemp("published")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(load_causal_lm(base_dir, trust_remote_code=False, dtype=torch.float32), config)
    model.save_pretrained(out / "adapter")
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out / "tokenizer")
    return {"base": base_dir, "adapter": out / "adapter", "tokenizer": out / "tokenizer"}


def publish(
    storage: LocalStorage, weights: dict[str, Path], rows: list[Example] = ROWS, **hyperparameters: Any
) -> JobRecord:
    """A new job in `evaluating` with the adapter, tokenizer and held-out split its trainer stored."""
    job = JobRecord(
        id=new_job_id(), tenant=TENANT, created_at=now(), model=MODEL, training_file=new_file_id(), seed=0,
        lora=LoraSettings(), state=JobState.EVALUATING,
        hyperparameters=Hyperparameters(
            n_epochs=1, batch_size=1, micro_batch_size=1, learning_rate_multiplier=1.0, learning_rate=1e-2,
            **{"max_seq_length": 128, **hyperparameters},
        ),
    )  # fmt: skip
    storage.upload_directory(weights["adapter"], storage_keys.adapter_prefix(TENANT, job.id))
    storage.upload_directory(weights["tokenizer"], storage_keys.tokenizer_prefix(TENANT, job.id))
    storage.put_bytes(storage_keys.validation_split_key(TENANT, job.id), split_jsonl(rows))
    return job


def cache_entries(storage: LocalStorage) -> dict[str, bytes]:
    return {key: storage.get_bytes(key) for key in storage.list_keys(CACHE)}


def without_flag(report: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in report.items() if key != "base_from_cache"}


@pytest.fixture(scope="module")
def session_redis(redis_server: Any) -> Iterator[redis.Redis]:
    """Held-out splits need no Redis; the job of the cached evaluation keeps its events there."""
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def settings(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(data_dir=tmp_path_factory.mktemp("data"), model_cache_dir=model_cache, model_catalog=None)


@pytest.fixture(scope="module")
def first(
    settings: Settings,
    session_redis: redis.Redis,
    weights: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict[str, Any]]:
    """A storage folder after one job's evaluation (the base side computed and cached), and its report."""
    root = tmp_path_factory.mktemp("first") / "storage"
    storage = LocalStorage(root)
    report = evaluate(settings, session_redis, storage, publish(storage, weights))
    return root, report


def storage_after_first(first: tuple[Path, dict[str, Any]], tmp_path: Path) -> LocalStorage:
    shutil.copytree(first[0], tmp_path / "storage")
    return LocalStorage(tmp_path / "storage")


@pytest.fixture(scope="module")
def second(
    settings: Settings,
    session_redis: redis.Redis,
    weights: dict[str, Path],
    first: tuple[Path, dict[str, Any]],
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[LocalStorage, dict[str, Any], list[str]]:
    """A second job on the same base model, rows and settings, evaluated as the evaluator does (with its
    cancel watch): the storage after it, its report and its events."""
    storage = storage_after_first(first, tmp_path_factory.mktemp("second"))
    job = publish(storage, weights)
    jobs = JobStore(session_redis, storage)
    jobs.create(job, "created")
    report = evaluate(settings, session_redis, storage, job, watch=CancelWatch(jobs, job.id, job.attempt))
    return storage, report, [event["message"] for event in jobs.all_events(job.id)]


def test_the_first_evaluation_computes_the_base_side_and_stores_it_once(
    first: tuple[Path, dict[str, Any]],
) -> None:
    root, report = first
    assert report["base_from_cache"] is False
    (entry,) = cache_entries(LocalStorage(root)).values()
    stored = json.loads(entry)
    assert stored["tokens"]["loss"] == report["base"]["loss"]
    assert len(stored["replies"]) == report["generation"]["n_examples"] == len(ROWS)


def test_a_second_job_on_the_same_base_data_and_settings_reads_the_base_side_from_the_cache(
    first: tuple[Path, dict[str, Any]], second: tuple[LocalStorage, dict[str, Any], list[str]]
) -> None:
    storage, report, events = second
    assert report["base_from_cache"] is True
    assert cache_entries(storage) == cache_entries(LocalStorage(first[0]))  # read, not written again
    assert any("the base model's results from the cache" in message for message in events)


def test_a_cached_base_side_gives_the_same_report_as_a_computed_one(
    first: tuple[Path, dict[str, Any]], second: tuple[LocalStorage, dict[str, Any], list[str]]
) -> None:
    assert without_flag(second[1]) == without_flag(first[1])


def test_the_report_and_the_job_say_how_replies_are_bounded_and_how_many_prompts_the_device_gets(
    second: tuple[LocalStorage, dict[str, Any], list[str]],
) -> None:
    _, report, events = second
    device = default_device().type
    generation = report["generation"]
    assert (
        generation["prompt_limit"] == f"at most {GENERATION_ROWS[device]} prompts (the default on {device})"
    )
    assert generation["new_tokens"].startswith("each reply stops at EOS or at min(512, r + max(16, r // 2))")
    assert any(
        generation["prompt_limit"] in message and generation["new_tokens"] in message for message in events
    )


def test_the_prompt_count_is_the_request_else_the_setting_else_the_device_default() -> None:
    assert generation_plan(Settings(eval_generation_rows=4), 9).describe() == "at most 9 prompts (requested)"
    assert generation_plan(Settings(eval_generation_rows=4)).describe() == (
        "at most 4 prompts (TUNERY_EVAL_GENERATION_ROWS)"
    )
    assert generation_plan(Settings()).rows == GENERATION_ROWS[default_device().type]
    assert GENERATION_ROWS["cpu"] < GENERATION_ROWS["cuda"]


def _other_template(storage: LocalStorage, job: JobRecord) -> None:
    key = storage_keys.tokenizer_prefix(TENANT, job.id) + "chat_template.jinja"
    storage.put_bytes(key, storage.get_bytes(key).replace(b"<|im_start|>", b"<|im_start|> "))


CHANGES: dict[str, dict[str, Any]] = {
    "validation rows": {"rows": [*ROWS[:2], _chat("Hello", "Hello!", "en")]},
    "row groups": {"rows": [*ROWS[:2], _chat("Hello", "Hi!", "fr")]},
    "max_seq_length": {"max_seq_length": 96},
    "generated prompts": {"generation_rows": 2},
    "chat template": {"tokenizer": _other_template},
    "base model source": {"catalog_source": "path"},
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_the_base_side_is_computed_again_when_the_base_model_data_or_settings_change(
    settings: Settings,
    session_redis: redis.Redis,
    weights: dict[str, Path],
    first: tuple[Path, dict[str, Any]],
    tmp_path: Path,
    change: str,
) -> None:
    storage = storage_after_first(first, tmp_path)
    what = CHANGES[change]
    job = publish(storage, weights, what.get("rows", ROWS), max_seq_length=what.get("max_seq_length", 128))
    if "tokenizer" in what:
        what["tokenizer"](storage, job)
    if "catalog_source" in what:
        # The same catalog id, now naming a copy of the same weights by path.
        copy = shutil.copytree(weights["base"], tmp_path / "copy")
        catalog = tmp_path / "catalog.yaml"
        catalog.write_text(f"models:\n  {MODEL}:\n    source: path:{copy}\n    max_seq_length: 512\n")
        settings = settings.model_copy(update={"model_catalog": catalog})
    report = evaluate(settings, session_redis, storage, job, generation_rows=what.get("generation_rows"))
    assert report["base_from_cache"] is False
    assert len(cache_entries(storage)) == 2


def _not_json(entry: bytes) -> bytes:
    return entry[: len(entry) // 2]


def _a_reply_missing(entry: bytes) -> bytes:
    stored = json.loads(entry)
    stored["replies"].pop()
    return json.dumps(stored).encode()


def _other_inputs(entry: bytes) -> bytes:
    stored = json.loads(entry)
    stored["inputs"]["max_seq_length"] = 64
    return json.dumps(stored).encode()


def _a_loss_not_a_number(entry: bytes) -> bytes:
    stored = json.loads(entry)
    stored["tokens"]["loss"] = "low"
    return json.dumps(stored).encode()


@pytest.mark.parametrize("damage", [_not_json, _a_reply_missing, _other_inputs, _a_loss_not_a_number])
def test_a_corrupt_or_mismatched_entry_is_ignored_and_replaced_by_the_computed_base_side(
    settings: Settings,
    session_redis: redis.Redis,
    weights: dict[str, Path],
    first: tuple[Path, dict[str, Any]],
    tmp_path: Path,
    damage: Any,
) -> None:
    storage = storage_after_first(first, tmp_path)
    ((key, entry),) = cache_entries(storage).items()
    storage.put_bytes(key, damage(entry))

    report = evaluate(settings, session_redis, storage, publish(storage, weights))

    assert report["base_from_cache"] is False
    assert without_flag(report) == without_flag(first[1])
    assert cache_entries(storage) == {key: entry}  # computed again and stored whole


def cancelled_job(
    storage: LocalStorage, weights: dict[str, Path], client: redis.Redis
) -> tuple[JobRecord, CancelWatch]:
    """A published job cancelled by its user, and the watch its evaluation runs with."""
    job = publish(storage, weights)
    jobs = JobStore(client, storage)
    jobs.create(job, "created")
    jobs.transition(job.id, JobState.CANCELLED, "cancelled by the user")
    return job, CancelWatch(jobs, job.id, job.attempt)


def test_a_cancelled_job_whose_base_side_is_cached_stops_at_the_fine_tuned_models_first_forward_pass(
    settings: Settings,
    session_redis: redis.Redis,
    weights: dict[str, Path],
    first: tuple[Path, dict[str, Any]],
    tmp_path: Path,
) -> None:
    storage = storage_after_first(first, tmp_path)
    job, watch = cancelled_job(storage, weights, session_redis)

    with pytest.raises(EvaluationCancelled, match=f"job {job.id} is cancelled"):
        evaluate(settings, session_redis, storage, job, watch=watch)
    assert not storage.exists(storage_keys.generations_key(TENANT, job.id))


def test_a_cancelled_job_whose_base_side_is_not_cached_stops_and_leaves_no_forked_process_behind(
    settings: Settings, session_redis: redis.Redis, weights: dict[str, Path], tmp_path: Path
) -> None:
    storage = LocalStorage(tmp_path / "storage")
    job, watch = cancelled_job(storage, weights, session_redis)
    before = set(multiprocessing.active_children())  # other tests' process pools may live on

    with pytest.raises(EvaluationCancelled, match=f"job {job.id} is cancelled"):
        evaluate(settings, session_redis, storage, job, watch=watch)
    assert set(multiprocessing.active_children()) <= before
    assert cache_entries(storage) == {}


@pytest.mark.skipif(usable_cpus() < 2, reason="side by side needs two usable CPUs")
def test_both_models_scored_side_by_side_give_the_report_of_one_after_the_other(
    settings: Settings,
    session_redis: redis.Redis,
    weights: dict[str, Path],
    first: tuple[Path, dict[str, Any]],
    tmp_path: Path,
) -> None:
    storage = LocalStorage(tmp_path / "storage")
    job = publish(storage, weights)
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})  # one usable CPU: the base, then the tuned model, in this process
    try:
        report = evaluate(settings, session_redis, storage, job)
    finally:
        os.sched_setaffinity(0, allowed)

    assert without_flag(report) == without_flag(first[1])  # `first` scored them side by side


def test_a_standalone_evaluation_of_the_base_model_reuses_its_own_earlier_results(
    settings: Settings, redis_url: str, local_storage: LocalStorage
) -> None:
    client = redis.Redis.from_url(redis_url)
    file_id = new_file_id()
    body = split_jsonl(ROWS)
    file = FileRecord(
        id=file_id, tenant=TENANT, filename="valid.jsonl", purpose="fine-tune", bytes=len(body),
        created_at=now(), status="processed", sha256="0" * 64, storage_key=storage_keys.file_key(TENANT, file_id),
    )  # fmt: skip
    local_storage.put_bytes(file.storage_key, body)
    FileStore(client).save(file)

    fresh = evaluate_base_model(settings, client, local_storage, TENANT, MODEL, file_id, generation_rows=2)
    cached = evaluate_base_model(settings, client, local_storage, TENANT, MODEL, file_id, generation_rows=2)

    assert (fresh["base_from_cache"], cached["base_from_cache"]) == (False, True)
    assert without_flag(cached) == without_flag(fresh)
    assert len(cache_entries(local_storage)) == 1
