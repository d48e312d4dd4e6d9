"""Storing a training file: one streaming pass that writes it to storage and validates it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO

from services.api.context import Context
from shared import storage_keys
from shared.file_validation import ChatJsonlValidator
from shared.ids import new_file_id
from shared.records import FileRecord, now

UPLOAD_PURPOSES = ("fine-tune",)


class TeeReader:
    """A file-like reader that also hands every chunk it returns to a callback (the validator)."""

    def __init__(self, source: BinaryIO, on_chunk: Callable[[bytes], None]):
        self.source = source
        self.on_chunk = on_chunk

    def read(self, size: int = -1) -> bytes:
        chunk = self.source.read(size)
        if chunk:
            self.on_chunk(chunk)
        return chunk


class ChunksReader:
    """A file-like reader over an iterator of byte chunks (e.g. the parts of an upload, in order)."""

    def __init__(self, chunks: Iterable[bytes]):
        self.chunks: Iterator[bytes] = iter(chunks)
        self.pending = b""

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self.pending) < size:
            chunk = next(self.chunks, None)
            if chunk is None:
                break
            self.pending += chunk
        if size < 0:
            data, self.pending = self.pending, b""
        else:
            data, self.pending = self.pending[:size], self.pending[size:]
        return data


def ingest(ctx: Context, tenant: str, source: BinaryIO, filename: str, purpose: str) -> FileRecord:
    """Store `source` as a new file of `tenant`, validated on the way; bad files get status `error`."""
    file_id = new_file_id()
    key = storage_keys.file_key(tenant, file_id)
    validator = ChatJsonlValidator(max_line_bytes=ctx.settings.max_line_bytes)
    stored = ctx.storage.put_stream(key, TeeReader(source, validator.feed))  # type: ignore[arg-type]
    result = validator.finish()
    record = FileRecord(
        id=file_id,
        tenant=tenant,
        filename=filename,
        purpose=purpose,
        bytes=stored.size,
        created_at=now(),
        status="processed" if result.ok else "error",
        status_details=None if result.ok else result.summary(),
        sha256=stored.sha256,
        storage_key=key,
        format=result.format,
        n_examples=result.n_examples,
    )
    ctx.files.save(record)
    return record
