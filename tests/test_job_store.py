"""Job records, events and manifests (shared/platform/job_store.py) and file records (shared/platform/file_store.py).

Everything runs against the real test Redis and a local storage folder.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from shared.platform import storage_keys
from shared.platform.file_store import FileStore
from shared.platform.ids import new_file_id, new_job_id
from shared.platform.job_states import IllegalTransition, JobState
from shared.platform.job_store import JobNotFound, JobStore, StaleAttempt
from shared.platform.records import FileRecord, Hyperparameters, JobError, JobRecord, LoraSettings, now
from shared.platform.storage import LocalStorage

TENANT = "org-acme"
HAPPY_PATH = [JobState.QUEUED, JobState.RUNNING, JobState.EVALUATING, JobState.SUCCEEDED]


def job_record(
    *, tenant: str = TENANT, state: JobState = JobState.VALIDATING_FILES, attempt: int = 0
) -> JobRecord:
    return JobRecord(
        id=new_job_id(),
        tenant=tenant,
        created_at=now(),
        model="tunery/tiny-chat",
        training_file=new_file_id(),
        seed=7,
        hyperparameters=Hyperparameters(
            n_epochs=3,
            batch_size=1,
            micro_batch_size=1,
            learning_rate_multiplier=1.0,
            learning_rate=2e-4,
            max_seq_length=512,
        ),
        lora=LoraSettings(),
        state=state,
        attempt=attempt,
    )


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


@pytest.fixture
def store(client: redis.Redis, local_storage: LocalStorage) -> JobStore:
    return JobStore(client, local_storage)


def manifest(store: JobStore, record: JobRecord) -> JobRecord:
    key = storage_keys.job_manifest_key(record.tenant, record.id)
    return JobRecord.model_validate_json(store.storage.get_bytes(key))


def snapshot(store: JobStore, record: JobRecord) -> tuple[bytes | None, bytes, list, dict[str, int]]:
    """Everything a failed transition must leave untouched: record, manifest, events, counts."""
    raw = store.redis.get(f"tunery:job:{record.id}")
    manifest_bytes = store.storage.get_bytes(storage_keys.job_manifest_key(record.tenant, record.id))
    return raw, manifest_bytes, store.all_events(record.id), store.state_counts()


# -- create and get -----------------------------------------------------------------------------


def test_create_stores_the_record_and_writes_its_manifest(store: JobStore) -> None:
    record = job_record()
    store.create(record, "Created fine-tuning job")
    key = f"tenants/{TENANT}/jobs/{record.id}/job.json"
    assert store.storage.exists(key)
    assert JobRecord.model_validate_json(store.storage.get_bytes(key)) == record
    assert store.get(record.id) == record


def test_create_counts_the_state_and_records_the_first_event(store: JobStore) -> None:
    record = job_record()
    store.create(record, "Created fine-tuning job")
    assert store.state_counts() == {"validating_files": 1}
    [event] = store.all_events(record.id)
    assert (event["level"], event["message"], event["type"], event["data"]) == (
        "info",
        "Created fine-tuning job",
        "message",
        None,
    )


def test_another_tenant_cannot_get_a_job(store: JobStore) -> None:
    record = job_record()
    store.create(record, "created")
    assert store.get(record.id, tenant="other") is None
    assert store.get(record.id, tenant=TENANT) == record


def test_a_missing_job_is_none_and_require_raises(store: JobStore) -> None:
    assert store.get("ftjob-missing") is None
    with pytest.raises(JobNotFound):
        store.require("ftjob-missing")
    with pytest.raises(JobNotFound):
        store.transition("ftjob-missing", JobState.CANCELLED, "cancel")


def test_jobs_are_listed_per_tenant_newest_first_with_paging(store: JobStore) -> None:
    records = [job_record() for _ in range(5)]
    for record in records:
        store.create(record, "created")
    store.create(job_record(tenant="other"), "created")

    first, more = store.list(TENANT, after=None, limit=3)
    assert [r.id for r in first] == [r.id for r in reversed(records[2:])]
    assert more is True
    rest, more = store.list(TENANT, after=first[-1].id, limit=3)
    assert [r.id for r in rest] == [records[1].id, records[0].id]
    assert more is False


# -- transitions --------------------------------------------------------------------------------


def test_every_transition_rewrites_the_manifest_with_the_new_state(store: JobStore) -> None:
    record = job_record()
    store.create(record, "created")
    for target in HAPPY_PATH:
        updated = store.transition(record.id, target, f"now {target.value}")
        assert updated.state is target
        assert store.require(record.id) == updated
        assert manifest(store, record) == updated


def test_running_sets_started_at_and_a_terminal_state_sets_finished_at(store: JobStore) -> None:
    record = job_record(state=JobState.QUEUED)
    record.estimated_finish = now() + 600
    store.create(record, "created")
    running = store.transition(record.id, JobState.RUNNING, "started")
    assert running.started_at is not None and running.finished_at is None
    store.transition(record.id, JobState.EVALUATING, "evaluating")
    done = store.transition(record.id, JobState.SUCCEEDED, "done")
    assert done.finished_at is not None
    assert done.estimated_finish is None
    assert done.started_at == running.started_at


def test_a_transition_records_its_event_error_and_mutation(store: JobStore) -> None:
    record = job_record(state=JobState.RUNNING)
    store.create(record, "created")
    error = JobError(code="out_of_memory", message="CUDA out of memory")

    def note(r: JobRecord) -> None:
        r.trained_tokens = 1234

    failed = store.transition(
        record.id,
        JobState.FAILED,
        "Training failed",
        level="error",
        error=error,
        mutate=note,
        data={"step": 3},
    )
    assert failed.error == error
    assert failed.trained_tokens == 1234
    assert manifest(store, record) == failed
    last = store.all_events(record.id)[-1]
    assert (last["level"], last["message"], last["data"]) == ("error", "Training failed", {"step": 3})


def test_state_counts_follow_transitions(store: JobStore) -> None:
    a, b = job_record(), job_record()
    store.create(a, "created")
    store.create(b, "created")
    store.transition(a.id, JobState.QUEUED, "queued")
    store.transition(a.id, JobState.CANCELLED, "cancelled")
    store.transition(b.id, JobState.QUEUED, "queued")
    assert store.state_counts() == {"validating_files": 0, "queued": 1, "cancelled": 1}


def test_the_evaluating_self_loop_leaves_state_counts_unchanged(store: JobStore) -> None:
    record = job_record(state=JobState.EVALUATING)
    store.create(record, "created")
    store.transition(record.id, JobState.EVALUATING, "evaluator preempted; re-enqueued")
    assert store.state_counts() == {"evaluating": 1}


def test_an_illegal_transition_changes_nothing(store: JobStore) -> None:
    record = job_record(state=JobState.QUEUED)
    store.create(record, "created")
    before = snapshot(store, record)
    with pytest.raises(IllegalTransition, match=r"^a job cannot go from queued to succeeded$"):
        store.transition(record.id, JobState.SUCCEEDED, "done")
    assert snapshot(store, record) == before


def test_a_terminal_job_cannot_be_cancelled(store: JobStore) -> None:
    record = job_record(state=JobState.SUCCEEDED)
    store.create(record, "created")
    before = snapshot(store, record)
    with pytest.raises(IllegalTransition, match=r"^a job cannot go from succeeded to cancelled$"):
        store.transition(record.id, JobState.CANCELLED, "cancel")
    assert snapshot(store, record) == before


def test_a_stale_attempt_is_refused_and_changes_nothing(store: JobStore) -> None:
    record = job_record(state=JobState.RUNNING, attempt=2)
    store.create(record, "created")
    before = snapshot(store, record)
    with pytest.raises(StaleAttempt, match=rf"^job {record.id} is on attempt 2, not 1$"):
        store.transition(record.id, JobState.EVALUATING, "training done", expected_attempt=1)
    assert snapshot(store, record) == before


def test_a_stale_attempt_cannot_update_the_record_either(store: JobStore) -> None:
    record = job_record(state=JobState.RUNNING, attempt=2)
    store.create(record, "created")
    before = snapshot(store, record)

    def progress(r: JobRecord) -> None:
        r.progress.step = 99

    with pytest.raises(StaleAttempt):
        store.update(record.id, progress, expected_attempt=1)
    assert snapshot(store, record) == before


def test_the_current_attempt_may_transition(store: JobStore) -> None:
    record = job_record(state=JobState.RUNNING, attempt=2)
    store.create(record, "created")
    assert store.transition(record.id, JobState.EVALUATING, "done", expected_attempt=2).state is (
        JobState.EVALUATING
    )


def test_update_refuses_to_change_the_state(store: JobStore) -> None:
    record = job_record(state=JobState.RUNNING)
    store.create(record, "created")

    def sneak(r: JobRecord) -> None:
        r.state = JobState.SUCCEEDED

    with pytest.raises(ValueError, match=r"^use JobStore\.transition to change a job's state$"):
        store.update(record.id, sneak)
    assert store.require(record.id).state is JobState.RUNNING


# -- concurrency --------------------------------------------------------------------------------


def race(*actions: Callable[[], object]) -> list[BaseException | None]:
    """Run the actions at the same moment in threads; the exception each raised, or None."""
    barrier = threading.Barrier(len(actions))
    outcomes: list[BaseException | None] = [None] * len(actions)

    def run(i: int, action: Callable[[], object]) -> None:
        barrier.wait()
        try:
            action()
        except BaseException as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=run, args=(i, a)) for i, a in enumerate(actions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    return outcomes


def assert_counts_match_records(store: JobStore, records: list[JobRecord]) -> None:
    actual = Counter(store.require(r.id).state.value for r in records)
    assert {state: n for state, n in store.state_counts().items() if n} == dict(actual)


def test_succeeded_and_cancelled_racing_leave_exactly_one_winner(store: JobStore) -> None:
    records = [job_record(state=JobState.EVALUATING) for _ in range(20)]
    for record in records:
        store.create(record, "created")
        outcomes = race(
            lambda r=record: store.transition(r.id, JobState.SUCCEEDED, "evaluated"),
            lambda r=record: store.transition(r.id, JobState.CANCELLED, "cancelled by user"),
        )
        assert sum(o is None for o in outcomes) == 1, outcomes
        assert all(isinstance(o, IllegalTransition) for o in outcomes if o is not None)
        final = store.require(record.id)
        winner = JobState.SUCCEEDED if outcomes[0] is None else JobState.CANCELLED
        assert final.state is winner
        messages = [e["message"] for e in store.all_events(record.id)]
        assert messages == ["created", "evaluated" if winner is JobState.SUCCEEDED else "cancelled by user"]
    assert_counts_match_records(store, records)


def test_only_one_of_many_concurrent_cancels_wins(store: JobStore) -> None:
    record = job_record(state=JobState.RUNNING)
    store.create(record, "created")
    outcomes = race(*[lambda: store.transition(record.id, JobState.CANCELLED, "cancel")] * 8)
    assert sum(o is None for o in outcomes) == 1
    assert all(isinstance(o, IllegalTransition) for o in outcomes if o is not None)
    assert store.state_counts() == {"running": 0, "cancelled": 1}
    assert [e["message"] for e in store.all_events(record.id)] == ["created", "cancel"]


def test_cancel_racing_the_evaluation_handoff_always_ends_cancelled(store: JobStore) -> None:
    """running→evaluating then cancel are both legal; cancel then evaluating is not: cancel always wins."""
    records = [job_record(state=JobState.RUNNING) for _ in range(20)]
    for record in records:
        store.create(record, "created")
        outcomes = race(
            lambda r=record: store.transition(r.id, JobState.EVALUATING, "training done"),
            lambda r=record: store.transition(r.id, JobState.CANCELLED, "cancelled by user"),
        )
        assert outcomes[1] is None
        assert outcomes[0] is None or isinstance(outcomes[0], IllegalTransition)
        assert store.require(record.id).state is JobState.CANCELLED
    assert_counts_match_records(store, records)
    assert store.state_counts()["cancelled"] == 20


class PausingStorage(LocalStorage):
    """Local storage whose next write waits until released: a slow S3 PUT, deterministically."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.pause_next = False
        self.paused = threading.Event()
        self.resume = threading.Event()

    def put_bytes(self, key: str, data: bytes) -> None:
        if self.pause_next:
            self.pause_next = False
            self.paused.set()
            self.resume.wait(timeout=5)
        super().put_bytes(key, data)


def test_the_manifest_ends_with_the_latest_state_when_writes_overlap(
    client: redis.Redis, tmp_path: Path
) -> None:
    storage = PausingStorage(tmp_path / "storage")
    store = JobStore(client, storage)
    record = job_record(state=JobState.RUNNING)
    store.create(record, "created")

    storage.pause_next = True
    trainer = threading.Thread(
        target=store.transition, args=(record.id, JobState.EVALUATING, "training done")
    )
    trainer.start()
    try:
        assert storage.paused.wait(timeout=5)  # evaluating is committed; its manifest write is slow
        store.transition(record.id, JobState.CANCELLED, "cancelled by user")
    finally:
        storage.resume.set()
        trainer.join(timeout=5)

    assert store.require(record.id).state is JobState.CANCELLED
    assert manifest(store, record).state is JobState.CANCELLED


# -- events -------------------------------------------------------------------------------------


def test_events_are_listed_newest_first_with_after_paging(store: JobStore) -> None:
    record = job_record()
    store.create(record, "event 0")
    for i in range(1, 5):
        store.add_event(record.id, f"event {i}")

    page, more = store.list_events(record.id, after=None, limit=2)
    assert [e["message"] for e in page] == ["event 4", "event 3"]
    assert more is True
    page, more = store.list_events(record.id, after=page[-1]["id"], limit=2)
    assert [e["message"] for e in page] == ["event 2", "event 1"]
    assert more is True
    page, more = store.list_events(record.id, after=page[-1]["id"], limit=2)
    assert [e["message"] for e in page] == ["event 0"]
    assert more is False


def test_a_full_last_page_says_there_is_no_more(store: JobStore) -> None:
    record = job_record()
    store.create(record, "event 0")
    store.add_event(record.id, "event 1")
    page, more = store.list_events(record.id, after=None, limit=2)
    assert [e["message"] for e in page] == ["event 1", "event 0"]
    assert more is False


def test_events_have_openai_shape(store: JobStore) -> None:
    record = job_record()
    store.create(record, "created")
    store.add_event(record.id, "step 10", level="warn", type="metrics", data={"step": 10, "train_loss": 1.5})
    [event], _ = store.list_events(record.id, after=None, limit=1)
    assert event["id"].startswith("ftevent-")
    assert event["object"] == "fine_tuning.job.event"
    assert (event["level"], event["message"], event["type"], event["data"]) == (
        "warn",
        "step 10",
        "metrics",
        {"step": 10, "train_loss": 1.5},
    )
    assert isinstance(event["created_at"], int)


def test_an_unknown_event_cursor_yields_an_empty_page(store: JobStore) -> None:
    record = job_record()
    store.create(record, "created")
    assert store.list_events(record.id, after="not-an-event-id", limit=10) == ([], False)


def test_transition_events_appear_in_the_event_list(store: JobStore) -> None:
    record = job_record()
    store.create(record, "created")
    store.transition(record.id, JobState.QUEUED, "Files validated; job queued")
    events, _ = store.list_events(record.id, after=None, limit=10)
    assert [e["message"] for e in events] == ["Files validated; job queued", "created"]


# -- files --------------------------------------------------------------------------------------


def file_record(purpose: str = "fine-tune", tenant: str = TENANT) -> FileRecord:
    file_id = new_file_id()
    return FileRecord(
        id=file_id,
        tenant=tenant,
        filename=f"{file_id}.jsonl",
        purpose=purpose,
        bytes=10,
        created_at=now(),
        status="processed",
        sha256="0" * 64,
        storage_key=storage_keys.file_key(tenant, file_id),
    )


@pytest.fixture
def files(client: redis.Redis) -> FileStore:
    return FileStore(client)


def save_all(files: FileStore, records: list[FileRecord]) -> list[str]:
    for record in records:
        files.save(record)
    return [r.id for r in records]


def test_files_are_listed_newest_first_by_default(files: FileStore) -> None:
    ids = save_all(files, [file_record() for _ in range(3)])
    listed, more = files.list(TENANT, after=None, limit=10)
    assert [r.id for r in listed] == ids[::-1]
    assert more is False


def test_file_listing_pages_with_after(files: FileStore) -> None:
    ids = save_all(files, [file_record() for _ in range(5)])
    first, more = files.list(TENANT, after=None, limit=2)
    assert ([r.id for r in first], more) == ([ids[4], ids[3]], True)
    second, more = files.list(TENANT, after=first[-1].id, limit=2)
    assert ([r.id for r in second], more) == ([ids[2], ids[1]], True)
    third, more = files.list(TENANT, after=second[-1].id, limit=2)
    assert ([r.id for r in third], more) == ([ids[0]], False)


def test_file_listing_in_ascending_order(files: FileStore) -> None:
    ids = save_all(files, [file_record() for _ in range(4)])
    first, more = files.list(TENANT, after=None, limit=3, order="asc")
    assert ([r.id for r in first], more) == (ids[:3], True)
    rest, more = files.list(TENANT, after=first[-1].id, limit=3, order="asc")
    assert ([r.id for r in rest], more) == (ids[3:], False)


def test_file_listing_filters_by_purpose_across_pages(files: FileStore) -> None:
    purposes = ["fine-tune", "batch", "batch", "batch", "fine-tune", "fine-tune", "batch"]
    records = [file_record(purpose) for purpose in purposes]
    save_all(files, records)
    fine_tune = [r.id for r in reversed(records) if r.purpose == "fine-tune"]

    first, more = files.list(TENANT, after=None, limit=2, purpose="fine-tune")
    assert [r.id for r in first] == fine_tune[:2]
    assert more is True
    rest, more = files.list(TENANT, after=first[-1].id, limit=2, purpose="fine-tune")
    assert [r.id for r in rest] == fine_tune[2:]
    assert more is False


def test_file_listing_is_per_tenant(files: FileStore) -> None:
    mine = save_all(files, [file_record()])
    theirs = file_record(tenant="other")
    files.save(theirs)
    listed, _ = files.list(TENANT, after=None, limit=10)
    assert [r.id for r in listed] == mine
    assert files.get(theirs.id, tenant=TENANT) is None
    assert files.get(theirs.id, tenant="other") == theirs


def test_an_unknown_file_cursor_yields_an_empty_page(files: FileStore) -> None:
    save_all(files, [file_record() for _ in range(2)])
    assert files.list(TENANT, after="file-unknown", limit=10) == ([], False)


def test_a_deleted_file_is_gone_from_get_and_list(files: FileStore) -> None:
    keep, drop = file_record(), file_record()
    save_all(files, [keep, drop])
    files.delete(drop)
    assert files.get(drop.id, tenant=TENANT) is None
    listed, _ = files.list(TENANT, after=None, limit=10)
    assert [r.id for r in listed] == [keep.id]


def test_file_records_round_trip_through_redis(files: FileStore) -> None:
    record = file_record()
    record.n_examples, record.format = 12, "chat"
    files.save(record)
    assert files.get(record.id, tenant=TENANT) == record
    stored = json.loads(files.redis.get(f"tunery:file:{record.id}"))
    assert stored["storage_key"] == f"tenants/{TENANT}/files/{record.id}"
