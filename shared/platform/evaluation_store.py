"""Standalone evaluations in Redis: one JSON record each, and a per-tenant index, newest first."""

from __future__ import annotations

import time
from collections.abc import Callable

from redis import Redis

from shared.platform.records import EvaluationRecord


def _record_key(evaluation_id: str) -> str:
    return f"tunery:evaluation:{evaluation_id}"


def _index_key(tenant: str) -> str:
    return f"tunery:tenant:{tenant}:evaluations"


class EvaluationStore:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    def create(self, record: EvaluationRecord) -> None:
        with self.redis.pipeline() as pipe:
            pipe.set(_record_key(record.id), record.model_dump_json())
            # Scored by the exact time: evaluations created within one second keep their order.
            pipe.zadd(_index_key(record.tenant), {record.id: time.time()})
            pipe.execute()

    def get(self, evaluation_id: str, tenant: str | None = None) -> EvaluationRecord | None:
        """The record; None when missing or (with `tenant`) another tenant's."""
        raw = self.redis.get(_record_key(evaluation_id))
        if raw is None:
            return None
        record = EvaluationRecord.model_validate_json(raw)
        return record if tenant is None or record.tenant == tenant else None

    def update(self, evaluation_id: str, mutate: Callable[[EvaluationRecord], None]) -> EvaluationRecord:
        """Read, change and write back. One evaluator works on an evaluation at a time: no race to guard."""
        record = self.get(evaluation_id)
        if record is None:
            raise KeyError(evaluation_id)
        mutate(record)
        self.redis.set(_record_key(evaluation_id), record.model_dump_json())
        return record

    def list(self, tenant: str, *, after: str | None, limit: int) -> tuple[list[EvaluationRecord], bool]:
        """Newest first, paged with `after` (an evaluation id)."""
        ids = [raw.decode() for raw in self.redis.zrevrange(_index_key(tenant), 0, -1)]
        if after is not None:
            ids = ids[ids.index(after) + 1 :] if after in ids else []
        records = [r for r in (self.get(i) for i in ids[: limit + 1]) if r is not None]
        return records[:limit], len(records) > limit
