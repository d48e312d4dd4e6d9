"""File records in Redis, indexed per tenant. The file bytes live in object storage."""

from __future__ import annotations

from redis import Redis

from shared.platform.listing import creation_score, page_ids
from shared.platform.records import FileRecord


def _record_key(file_id: str) -> str:
    return f"tunery:file:{file_id}"


def _index_key(tenant: str) -> str:
    return f"tunery:tenant:{tenant}:files"


# The ids of files stored but not yet validated (status `uploaded`): what an API process looks for at start.
UPLOADED_KEY = "tunery:files:uploaded"


def _claim_key(file_id: str) -> str:
    """Held (SET NX, with an expiry its holder keeps extending) by the one process validating the file."""
    return f"tunery:file:{file_id}:validating"


class FileStore:
    def __init__(self, redis: Redis):
        self.redis = redis

    def save(self, record: FileRecord) -> None:
        with self.redis.pipeline() as pipe:
            pipe.set(_record_key(record.id), record.model_dump_json())
            pipe.zadd(_index_key(record.tenant), {record.id: creation_score()}, nx=True)
            if record.status == "uploaded":
                pipe.sadd(UPLOADED_KEY, record.id)
            pipe.execute()

    def save_validated(self, record: FileRecord) -> bool:
        """Replace an `uploaded` record by its validated form; False (and nothing saved) when the file was
        deleted meanwhile, so that a late validation cannot bring it back."""
        with self.redis.pipeline() as pipe:
            pipe.set(_record_key(record.id), record.model_dump_json(), xx=True)
            pipe.srem(UPLOADED_KEY, record.id)
            saved, _ = pipe.execute()
        return bool(saved)

    def awaiting_validation(self) -> list[FileRecord]:
        """Every tenant's files still `uploaded`."""
        ids = sorted(i.decode() for i in self.redis.smembers(UPLOADED_KEY))
        if not ids:
            return []
        raws = self.redis.mget([_record_key(i) for i in ids])
        gone = [i for i, raw in zip(ids, raws, strict=True) if raw is None]
        if gone:
            self.redis.srem(UPLOADED_KEY, *gone)
        return [FileRecord.model_validate_json(raw) for raw in raws if raw is not None]

    def claim_validation(self, file_id: str, seconds: int) -> bool:
        """True when this caller now validates the file: no one else held it."""
        return bool(self.redis.set(_claim_key(file_id), "1", nx=True, ex=seconds))

    def extend_claim(self, file_id: str, seconds: int) -> None:
        self.redis.expire(_claim_key(file_id), seconds)

    def release_claim(self, file_id: str) -> None:
        self.redis.delete(_claim_key(file_id))

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
            pipe.srem(UPLOADED_KEY, record.id)
            pipe.execute()
