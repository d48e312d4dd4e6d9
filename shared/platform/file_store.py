"""File records in Redis, indexed per tenant. The file bytes live in object storage."""

from __future__ import annotations

from redis import Redis

from shared.platform.listing import creation_score, page_ids
from shared.platform.records import FileRecord


def _record_key(file_id: str) -> str:
    return f"tunery:file:{file_id}"


def _index_key(tenant: str) -> str:
    return f"tunery:tenant:{tenant}:files"


class FileStore:
    def __init__(self, redis: Redis):
        self.redis = redis

    def save(self, record: FileRecord) -> None:
        with self.redis.pipeline() as pipe:
            pipe.set(_record_key(record.id), record.model_dump_json())
            pipe.zadd(_index_key(record.tenant), {record.id: creation_score()}, nx=True)
            pipe.execute()

    def get(self, file_id: str, tenant: str) -> FileRecord | None:
        """The record, or None when it does not exist or belongs to another tenant."""
        raw = self.redis.get(_record_key(file_id))
        if raw is None:
            return None
        record = FileRecord.model_validate_json(raw)
        return record if record.tenant == tenant else None

    def list(
        self, tenant: str, *, after: str | None, limit: int, order: str = "desc", purpose: str | None = None
    ) -> tuple[list[FileRecord], bool]:
        records: list[FileRecord] = []
        cursor = after
        has_more = True
        # Filtering by purpose may skip ids, so keep paging until the page is full.
        while len(records) < limit and has_more:
            ids, has_more = page_ids(
                self.redis, _index_key(tenant), after=cursor, limit=limit, newest_first=order == "desc"
            )
            if not ids:
                break
            cursor = ids[-1]
            for raw in self.redis.mget([_record_key(i) for i in ids]):
                if raw is None:
                    continue
                record = FileRecord.model_validate_json(raw)
                if purpose is None or record.purpose == purpose:
                    records.append(record)
        more = has_more or len(records) > limit
        return records[:limit], more

    def delete(self, record: FileRecord) -> None:
        with self.redis.pipeline() as pipe:
            pipe.delete(_record_key(record.id))
            pipe.zrem(_index_key(record.tenant), record.id)
            pipe.execute()
