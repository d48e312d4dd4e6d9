"""Storing a dataset: received once (to a local copy and to storage at the same time), then validated
(every format of shared.data.formats): before the answer when small, after it when large."""

from __future__ import annotations

import logging
import os
import tempfile
import time
import unicodedata
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path, PurePath

from redis.exceptions import RedisError

from services.api.context import Context
from services.api.errors import APIError
from shared.data.formats import DataLimits
from shared.data.splits import suggested_split
from shared.data.validation_process import ValidationTimeout, check_file
from shared.platform import storage_keys
from shared.platform.ids import new_file_id
from shared.platform.records import FileRecord, now
from shared.platform.storage import ObjectNotFound, ObjectWriter, SizeMismatch, StorageError, StoredObject

log = logging.getLogger(__name__)

UPLOAD_PURPOSES = ("fine-tune",)
MAX_FILENAME_CHARS = 255
# Validation's budget in CPU seconds: at least this, and one second per 2 MB. Ordinary data validates at
# about 8 MB per CPU second (short chat rows, the slowest per byte), so a file of the largest size allowed
# fits; one four times slower than that is built to be slow (pathological JSON) and would hold a
# validation process for nothing.
VALIDATION_SECONDS = 120.0
VALIDATION_BYTES_PER_SECOND = 2 * 1024 * 1024
DEFAULT_FILENAME = "upload.jsonl"
# A validation after the answer holds a claim on its file (FileStore.claim_validation) for this long,
# renewed every CLAIM_RENEW_SECONDS while it runs: the claim of an API process that died lapses within
# seconds, and another process (or this one restarted) validates the file again.
CLAIM_SECONDS = 15
CLAIM_RENEW_SECONDS = 5.0


def safe_filename(name: str | None) -> str:
    """The name a file is stored and shown under: its base name only (no directories to traverse), without
    control or invisible format characters (no forged lines in logs or headers), at most 255 characters
    with the extension kept (it can choose the format)."""
    base = PurePath((name or "").replace("\\", "/")).name
    cleaned = "".join(c for c in base if unicodedata.category(c) not in ("Cc", "Cf", "Zl", "Zp")).strip()
    if cleaned in ("", ".", ".."):
        return DEFAULT_FILENAME
    if len(cleaned) > MAX_FILENAME_CHARS:
        suffix = PurePath(cleaned).suffix[:16]
        cleaned = cleaned[: MAX_FILENAME_CHARS - len(suffix)] + suffix
    return cleaned


def validation_budget(size: int) -> float:
    """CPU seconds that validating a file of `size` bytes may take."""
    return max(VALIDATION_SECONDS, size / VALIDATION_BYTES_PER_SECOND)


def timeout_message(seconds: float) -> str:
    return (
        f"file: validating it took more than {seconds:g} s of CPU time; upload a simpler file (or split it)"
    )


class IncomingFile:
    """A new file's bytes as they arrive, written at once to a local copy (a validation process reads it,
    so it needs a name) and to storage (S3 receives them while later bytes arrive), and hashed on the way:
    one pass, no second copy. `size`: the file's size when the request tells it ahead, which lets storage
    take the file in one stream; if another number of bytes comes, storage gets the local copy at the end.
    Blocking: call it from a thread, not the event loop."""

    def __init__(self, ctx: Context, tenant: str, size: int | None = None) -> None:
        self.id = new_file_id()
        self.tenant = tenant
        self.key = storage_keys.file_key(tenant, self.id)
        self.size = 0
        self._max_bytes = ctx.settings.max_upload_bytes
        self._storage = ctx.storage
        self._stored: ObjectWriter | None = ctx.storage.writer(self.key, size)
        fd, name = tempfile.mkstemp(prefix="tunery-upload-")
        self.path = Path(name)
        self._local = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        if self.size + len(data) > self._max_bytes:
            raise APIError(
                413, f"the file is larger than the limit of {self._max_bytes} bytes", param="file"
            )  # fmt: skip
        self._local.write(data)
        self.size += len(data)
        if self._stored is not None:
            try:
                self._stored.write(data)
            except SizeMismatch:
                self._stored = None  # more bytes than announced: stored from the local copy at the end

    def finish(self) -> StoredObject:
        """Store what was written; the local copy stays for validation."""
        self._local.close()
        if self._stored is not None:
            try:
                return self._stored.finish()
            except SizeMismatch:
                log.info(
                    "%s: %d bytes, not the size announced; storing it from its local copy",
                    self.key,
                    self.size,
                )
        return self._storage.put_file(self.path, self.key)

    def discard(self) -> None:
        """Drop the local copy and whatever storage holds of it: nothing is stored."""
        self._local.close()
        self.path.unlink(missing_ok=True)
        if self._stored is not None:
            self._stored.abort()


def ingest(
    ctx: Context, incoming: IncomingFile, filename: str, purpose: str, format: str | None = None
) -> FileRecord:
    """Store the received file as a new file of its tenant. A file up to TUNERY_SYNC_VALIDATION_BYTES is
    validated now and comes back `processed` or `error`; a larger one comes back `uploaded` and is validated
    in the background (ctx.validations), since validation takes about a CPU second per 8 MB: too long for
    the answer to wait. A file with problems is still stored, so its owner can fetch it and see what the
    report says, but no job accepts it."""
    try:
        stored = incoming.finish()
    except BaseException:
        incoming.discard()
        raise
    record = FileRecord(
        id=incoming.id, tenant=incoming.tenant, filename=filename, purpose=purpose, bytes=stored.size,
        created_at=now(), status="uploaded", sha256=stored.sha256, storage_key=stored.key, format=format,
    )  # fmt: skip
    if stored.size > ctx.settings.sync_validation_bytes:
        try:
            ctx.files.claim_validation(record.id, CLAIM_SECONDS)
            ctx.files.save(record)
        except BaseException:
            incoming.path.unlink(missing_ok=True)
            raise
        ctx.validations.submit(_validate_later, ctx, record, incoming.path)
        return record
    try:
        validated = _validated(ctx, record, incoming.path)
    except BaseException as exc:
        ctx.storage.delete(stored.key)  # no record will name it
        if isinstance(exc, ValidationTimeout):
            raise APIError(
                400, timeout_message(validation_budget(stored.size)), code="validation_timeout", param="file"
            ) from None
        raise
    finally:
        incoming.path.unlink(missing_ok=True)
    ctx.files.save(validated)
    return validated


def _validated(ctx: Context, record: FileRecord, path: Path, *, keep_claim: bool = False) -> FileRecord:
    """The record as validation of the local copy at `path` leaves it (ValidationTimeout past its budget);
    with `keep_claim`, the file's validation claim is renewed while it runs."""
    limits = DataLimits(max_line_bytes=ctx.settings.max_line_bytes)
    check = check_file(
        path, filename=record.filename, format=record.format, limits=limits,
        seconds=validation_budget(record.bytes),
        heartbeat=(lambda: ctx.files.extend_claim(record.id, CLAIM_SECONDS)) if keep_claim else None,
        heartbeat_seconds=CLAIM_RENEW_SECONDS,
    )  # fmt: skip
    return record.model_copy(
        update={
            "status": "processed" if check.ok else "error",
            "status_details": None if check.ok else check.summary(),
            "container": check.container,
            "format": check.format,
            "task": check.task,
            "n_examples": check.n_examples,
            "report": {
                # The first problems as rows (place, line, field, reason); GET /v1/files/{id} shows them.
                "problems": check.problem_list(),
                "total_problems": check.total_problems,
                "stats": check.stats,
                "personal_data": check.pii,
                # Used when a job names no validation file (shared/data/splits.py).
                "suggested_split": suggested_split(check.n_examples) if check.n_examples else None,
            },
        }
    )


def _validate_later(ctx: Context, record: FileRecord, path: Path) -> None:
    """In a thread of ctx.validations, holding the file's claim: validate the local copy at `path`, save the
    outcome, then delete the copy and let the claim go. A failure of Redis or of this process leaves the
    file `uploaded`, for resume_validations to pick up once the claim lapses."""
    try:
        try:
            validated = _validated(ctx, record, path, keep_claim=True)
        except ValidationTimeout:
            details = timeout_message(validation_budget(record.bytes))
            validated = record.model_copy(update={"status": "error", "status_details": details})
        except BrokenProcessPool:
            details = "file: its validation process died (out of memory?); upload it split into smaller files"
            validated = record.model_copy(update={"status": "error", "status_details": details})
        ctx.files.save_validated(validated)
        ctx.files.release_claim(record.id)
    except Exception:
        log.exception("validating %s failed; it is validated again once its claim lapses", record.id)
    finally:
        path.unlink(missing_ok=True)


def resume_validations(ctx: Context) -> None:
    """Validate again, from storage, every file left `uploaded` whose claim has lapsed (the API process that
    answered its upload died before validating it). Run at API start and with every janitor sweep."""
    try:
        for record in ctx.files.awaiting_validation():
            if ctx.files.claim_validation(record.id, CLAIM_SECONDS):
                log.info("validating %s again: it was left uploaded", record.id)
                ctx.validations.submit(_validate_from_storage, ctx, record)
    except RedisError as exc:
        log.warning("cannot look for files left uploaded: %s", exc)


def _validate_from_storage(ctx: Context, record: FileRecord) -> None:
    """Fetch the stored file to a local copy (renewing the claim as it comes), then validate it."""
    fd, name = tempfile.mkstemp(prefix="tunery-revalidate-")
    path = Path(name)
    try:
        renew_at = time.monotonic() + CLAIM_RENEW_SECONDS
        with os.fdopen(fd, "wb") as local:
            for chunk in ctx.storage.iter_chunks(record.storage_key):
                local.write(chunk)
                if time.monotonic() >= renew_at:
                    ctx.files.extend_claim(record.id, CLAIM_SECONDS)
                    renew_at = time.monotonic() + CLAIM_RENEW_SECONDS
    except ObjectNotFound:
        path.unlink(missing_ok=True)
        details = "file: its content is missing from storage; upload it again"
        ctx.files.save_validated(record.model_copy(update={"status": "error", "status_details": details}))
        ctx.files.release_claim(record.id)
        return
    except (StorageError, RedisError) as exc:
        path.unlink(missing_ok=True)
        log.warning("cannot fetch %s to validate it (%s); trying again once its claim lapses", record.id, exc)
        return
    _validate_later(ctx, record, path)
