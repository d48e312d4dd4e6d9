"""Job records and their event streams in Redis; a manifest per job in storage.

Every status change goes through `transition`, which checks the state machine, writes the record
and its event in one Redis transaction, then rewrites the job's manifest in object storage (the
durable record from which Redis can be rebuilt).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from redis import Redis, WatchError

from shared.platform import storage_keys
from shared.platform.job_states import JobState, check_transition, is_terminal
from shared.platform.listing import creation_score, page_ids
from shared.platform.records import JobError, JobRecord, now
from shared.platform.storage import Storage, StorageError

log = logging.getLogger(__name__)

STATE_COUNTS_KEY = "tunery:jobs:states"
MANIFEST_WRITE_ROUNDS = 5
ACTIVE_KEY = "tunery:jobs:active"


class JobNotFound(Exception):
    pass


class StaleAttempt(Exception):
    """The caller works on an attempt that is no longer the job's current one: it must not publish."""


def record_key(job_id: str) -> str:
    return f"tunery:job:{job_id}"


def _events_key(job_id: str) -> str:
    return f"tunery:job:{job_id}:events"


def _index_key(tenant: str) -> str:
    return f"tunery:tenant:{tenant}:jobs"


def _active_key(tenant: str) -> str:
    return f"tunery:tenant:{tenant}:active_jobs"


def _series_key(job_id: str) -> str:
    return f"tunery:job:{job_id}:series"


def _checkpoints_key(job_id: str) -> str:
    return f"tunery:job:{job_id}:checkpoints"


def _models_key(tenant: str) -> str:
    return f"tunery:tenant:{tenant}:models"


def owned_record(raw: bytes | None, tenant: str | None) -> JobRecord | None:
    """The stored record `raw`, or None when missing or (with `tenant`) owned by another tenant."""
    record = JobRecord.model_validate_json(raw) if raw is not None else None
    if record is None or (tenant is not None and record.tenant != tenant):
        return None
    return record


def _event_id(stream_id: str) -> str:
    return f"ftevent-{stream_id}"


def _stream_id(event_id: str) -> str | None:
    return event_id.removeprefix("ftevent-") if event_id.startswith("ftevent-") else None


class JobStore:
    def __init__(self, redis: Redis, storage: Storage, max_events: int = 10_000):
        self.redis = redis
        self.storage = storage
        self.max_events = max_events

    # -- records -----------------------------------------------------------------------------

    def create(self, record: JobRecord, message: str) -> None:
        with self.redis.pipeline() as pipe:
            pipe.set(record_key(record.id), record.model_dump_json())
            pipe.zadd(_index_key(record.tenant), {record.id: creation_score()}, nx=True)
            pipe.hincrby(STATE_COUNTS_KEY, record.state.value, 1)
            pipe.sadd(_active_key(record.tenant), record.id)
            pipe.sadd(ACTIVE_KEY, record.id)
            self._queue_event(pipe, record.id, "info", message, "message", None)
            pipe.execute()
        self._write_manifest(record)

    def get(self, job_id: str, tenant: str | None = None) -> JobRecord | None:
        """The record, or None when missing or (with `tenant`) owned by another tenant."""
        return owned_record(self.redis.get(record_key(job_id)), tenant)

    def require(self, job_id: str) -> JobRecord:
        record = self.get(job_id)
        if record is None:
            raise JobNotFound(job_id)
        return record

    def list(
        self, tenant: str, *, after: str | None, limit: int, metadata: dict[str, str] | None = None
    ) -> tuple[list[JobRecord], bool]:
        """Newest first; with `metadata`, only jobs whose metadata holds every given pair."""
        records: list[JobRecord] = []
        cursor, has_more = after, True
        while len(records) <= limit and has_more:
            ids, has_more = page_ids(self.redis, _index_key(tenant), after=cursor, limit=limit)
            if not ids:
                break
            cursor = ids[-1]
            for raw in self.redis.mget([record_key(i) for i in ids]):
                record = JobRecord.model_validate_json(raw) if raw is not None else None
                if record is not None and _matches(record, metadata):
                    records.append(record)
            if not metadata:
                break
        return records[:limit], has_more or len(records) > limit

    def active_jobs(self) -> list[JobRecord]:
        """Every job of every tenant not yet finished (the janitor's worklist)."""
        ids = [i.decode() for i in self.redis.smembers(ACTIVE_KEY)]
        raws = self.redis.mget([record_key(i) for i in ids]) if ids else []
        return [JobRecord.model_validate_json(r) for r in raws if r is not None]

    def active_count(self, tenant: str) -> int:
        """Jobs of the tenant not yet succeeded, failed or cancelled."""
        return self.redis.scard(_active_key(tenant))

    def state_counts(self) -> dict[str, int]:
        raw = self.redis.hgetall(STATE_COUNTS_KEY)
        return {k.decode(): int(v) for k, v in raw.items()}

    def update(
        self, job_id: str, mutate: Callable[[JobRecord], None], *, expected_attempt: int | None = None
    ) -> JobRecord:
        """Apply `mutate` to the current record atomically (no state change: see `transition`)."""

        def apply(record: JobRecord) -> None:
            before = record.state
            mutate(record)
            if record.state is not before:
                raise ValueError("use JobStore.transition to change a job's state")

        record, _ = self._atomic(job_id, apply, expected_attempt=expected_attempt, event=None)
        return record

    def transition(
        self,
        job_id: str,
        target: JobState,
        message: str,
        *,
        level: str = "info",
        expected_attempt: int | None = None,
        error: JobError | None = None,
        mutate: Callable[[JobRecord], None] | None = None,
        data: dict[str, Any] | None = None,
    ) -> JobRecord:
        """Move a job to `target` if the state machine allows it; raise IllegalTransition otherwise."""

        def apply(record: JobRecord) -> None:
            check_transition(record.state, target)
            record.state = target
            if error is not None:
                record.error = error
            if target is JobState.RUNNING and record.started_at is None:
                record.started_at = now()
            if is_terminal(target):
                record.finished_at = now()
                record.estimated_finish = None
            if mutate is not None:
                mutate(record)

        record, previous = self._atomic(
            job_id, apply, expected_attempt=expected_attempt, event=(level, message, data)
        )
        log.info("job %s: %s -> %s", job_id, previous.value, target.value)
        self._write_manifest(record)
        return record

    def _atomic(
        self,
        job_id: str,
        apply: Callable[[JobRecord], None],
        *,
        expected_attempt: int | None,
        event: tuple[str, str, dict[str, Any] | None] | None,
    ) -> tuple[JobRecord, JobState]:
        key = record_key(job_id)
        while True:
            with self.redis.pipeline() as pipe:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        raise JobNotFound(job_id)
                    record = JobRecord.model_validate_json(raw)
                    if expected_attempt is not None and record.attempt != expected_attempt:
                        raise StaleAttempt(
                            f"job {job_id} is on attempt {record.attempt}, not {expected_attempt}"
                        )
                    previous = record.state
                    apply(record)
                    pipe.multi()
                    pipe.set(key, record.model_dump_json())
                    if record.state is not previous:
                        pipe.hincrby(STATE_COUNTS_KEY, previous.value, -1)
                        pipe.hincrby(STATE_COUNTS_KEY, record.state.value, 1)
                        if is_terminal(record.state):
                            pipe.srem(_active_key(record.tenant), record.id)
                            pipe.srem(ACTIVE_KEY, record.id)
                    if event is not None:
                        level, message, data = event
                        self._queue_event(pipe, job_id, level, message, "message", data)
                    pipe.execute()
                    return record, previous
                except WatchError:
                    continue

    def _write_manifest(self, record: JobRecord) -> None:
        """Write the manifest, then check it is still the latest record; rewrite it if not.

        Two transitions can write their manifests in either order (a slow S3 PUT finishes last).
        Every writer re-reads Redis after its write, so the last write to land is always followed by
        a check that puts the newest record in place. Best effort: storage already retries.
        """
        key = storage_keys.job_manifest_key(record.tenant, record.id)
        body = record.model_dump_json(indent=2)
        for _ in range(MANIFEST_WRITE_ROUNDS):
            try:
                self.storage.put_bytes(key, body.encode())
            except StorageError:
                log.exception("could not write the manifest of job %s", record.id)
                return
            current = self.get(record.id)
            if current is None or current.state is record.state:
                return
            body, record = current.model_dump_json(indent=2), current

    # -- checkpoints ---------------------------------------------------------------------------

    def add_checkpoint(self, job_id: str, checkpoint: dict[str, Any]) -> None:
        self.redis.lpush(_checkpoints_key(job_id), json.dumps(checkpoint))

    def remove_checkpoint(self, job_id: str, checkpoint_id: str) -> None:
        for raw in self.redis.lrange(_checkpoints_key(job_id), 0, -1):
            if json.loads(raw)["id"] == checkpoint_id:
                self.redis.lrem(_checkpoints_key(job_id), 1, raw)

    def list_checkpoints(
        self, job_id: str, *, after: str | None, limit: int
    ) -> tuple[list[dict[str, Any]], bool]:
        """Newest first, paged with `after` (a checkpoint id)."""
        checkpoints = [json.loads(raw) for raw in self.redis.lrange(_checkpoints_key(job_id), 0, -1)]
        if after is not None:
            ids = [c["id"] for c in checkpoints]
            checkpoints = checkpoints[ids.index(after) + 1 :] if after in ids else []
        return checkpoints[:limit], len(checkpoints) > limit

    # -- fine-tuned models ---------------------------------------------------------------------

    def register_fine_tuned_model(self, record: JobRecord) -> None:
        assert record.fine_tuned_model is not None
        self.redis.zadd(_models_key(record.tenant), {f"{record.fine_tuned_model}\t{record.id}": now()})

    def unregister_fine_tuned_model(self, tenant: str, model_id: str, job_id: str) -> bool:
        return bool(self.redis.zrem(_models_key(tenant), f"{model_id}\t{job_id}"))

    def job_of_fine_tuned_model(self, tenant: str, model_id: str) -> str | None:
        """The id of the job that made `model_id`, a fine-tuned model of `tenant` (None: not one)."""
        return next(
            (job_id for model, job_id, _ in self.fine_tuned_models(tenant) if model == model_id), None
        )

    def fine_tuned_models(self, tenant: str) -> list[tuple[str, str, int]]:
        """(model id, job id, created) of a tenant's fine-tuned models, oldest first."""
        entries = self.redis.zrange(_models_key(tenant), 0, -1, withscores=True)
        models = []
        for member, score in entries:
            model_id, job_id = member.decode().split("\t")
            models.append((model_id, job_id, int(score)))
        return models

    # -- events ------------------------------------------------------------------------------

    def add_event(
        self,
        job_id: str,
        message: str,
        *,
        level: str = "info",
        type: str = "message",
        data: dict[str, Any] | None = None,
    ) -> None:
        with self.redis.pipeline(transaction=False) as pipe:
            self._queue_event(pipe, job_id, level, message, type, data)
            pipe.execute()

    def _queue_event(
        self, pipe: Any, job_id: str, level: str, message: str, type: str, data: dict[str, Any] | None
    ) -> None:
        body = {"created_at": now(), "level": level, "message": message, "type": type, "data": data}
        pipe.xadd(_events_key(job_id), {"e": json.dumps(body)}, maxlen=self.max_events, approximate=True)

    def list_events(self, job_id: str, *, after: str | None, limit: int) -> tuple[list[dict[str, Any]], bool]:
        """Newest first, as OpenAI lists them; `after` is the id of the last event already seen."""
        upper = "+"
        if after is not None:
            stream_id = _stream_id(after)
            if stream_id is None:
                return [], False
            upper = f"({stream_id}"
        entries = self.redis.xrevrange(_events_key(job_id), max=upper, min="-", count=limit + 1)
        events = []
        for stream_id, fields in entries[:limit]:
            body = json.loads(fields[b"e"])
            events.append({"id": _event_id(stream_id.decode()), "object": "fine_tuning.job.event", **body})
        return events, len(entries) > limit

    def all_events(self, job_id: str) -> list[dict[str, Any]]:
        """Oldest first."""
        return self.events_after(job_id, None, block_ms=None)

    def events_after(self, job_id: str, after: str | None, *, block_ms: int | None) -> list[dict[str, Any]]:
        """Events newer than `after` (an event id; None: from the start), oldest first, waiting up to
        `block_ms` for one to arrive when there is none yet (the live stream)."""
        start = _stream_id(after) if after else "0-0"
        if block_ms is None:
            entries = self.redis.xrange(_events_key(job_id), min=f"({start}" if after else "-")
        else:
            reply = self.redis.xread({_events_key(job_id): start}, block=block_ms)
            entries = reply[0][1] if reply else []
        return [
            {"id": _event_id(sid.decode()), "object": "fine_tuning.job.event", **json.loads(fields[b"e"])}
            for sid, fields in entries
        ]

    # -- per-step metrics ----------------------------------------------------------------------

    def reset_step_metrics(self, job_id: str) -> None:
        """A new attempt that trains from its first step again: its series starts afresh."""
        self.redis.delete(_series_key(job_id))

    def keep_step_metrics(self, job_id: str, up_to_step: int) -> None:
        """An attempt resumed from the checkpoint of `up_to_step`: later rows will be trained again, and a
        validation at that very step too (a checkpoint at an epoch's last step precedes its validation)."""
        kept = [
            row for row in self.step_metrics(job_id)
            if row["step"] < up_to_step or (row["step"] == up_to_step and row.get("kind") != "validation")
        ]  # fmt: skip
        with self.redis.pipeline() as pipe:  # MULTI: readers see the old series or the new one
            pipe.delete(_series_key(job_id))
            if kept:
                pipe.rpush(_series_key(job_id), *(json.dumps(row) for row in kept))
            pipe.execute()

    def add_step_metrics(self, job_id: str, *rows: dict[str, Any]) -> None:
        """Append rows to the job's metrics series, in order, in one command."""
        if rows:
            self.redis.rpush(_series_key(job_id), *(json.dumps(row) for row in rows))

    def step_metrics(self, job_id: str) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in self.redis.lrange(_series_key(job_id), 0, -1)]


def _matches(record: JobRecord, metadata: dict[str, str] | None) -> bool:
    if not metadata:
        return True
    return all((record.metadata or {}).get(k) == v for k, v in metadata.items())
