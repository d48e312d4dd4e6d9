"""POST /v1/files' multipart form, parsed as it arrives: the `file` part's bytes go to an IncomingFile (local
copy and storage at once) while later bytes are still on the wire, instead of Starlette's parse of the whole
body into a spooled file before the handler runs, and the handler's copy of it."""

from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from python_multipart.multipart import (
    MultipartParseError,
    MultipartParser,
    MultipartState,
    parse_options_header,
)

from services.api.context import Context
from services.api.errors import APIError
from services.api.file_ingest import IncomingFile

# Bytes of the file handed to the writing thread at a time: few enough hand-offs to cost little, small
# enough that the thread writes while the event loop receives the next ones; up to WRITES_AHEAD of them may
# wait for it, so that a write slowed for a moment (storage busy) does not stop the receiving.
WRITE_BYTES = 1024 * 1024
WRITES_AHEAD = 4
# What the form's other fields (purpose, format) may hold together: a body without a Content-Length is
# only limited as it arrives.
MAX_FIELDS_BYTES = 64 * 1024


@dataclass
class UploadForm:
    """What the form held: its small fields, and the file (None when it had no `file` part)."""

    fields: dict[str, str]
    file: IncomingFile | None
    filename: str | None


class _Parts:
    """python_multipart's callbacks: small fields gathered, the file part's bytes queued for `take`."""

    def __init__(self) -> None:
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.file_started = False
        self.fed = 0  # bytes of the body given to the parser before the chunk it is parsing
        self.file_offset: int | None = None  # where the file's first byte is in the body
        self._file_bytes: list[bytes] = []
        self._headers: dict[bytes, bytes] = {}
        self._header = b""
        self._value = b""
        self._name = ""
        self._kind = (
            "field"  # the part being read: "file", a "field" kept, or a "skipped" file of another name
        )
        self._field = bytearray()
        self._fields_bytes = 0

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def take(self) -> bytes:
        """The file's bytes parsed since the last call."""
        data = b"".join(self._file_bytes)
        self._file_bytes.clear()
        return data

    def _part_begin(self) -> None:
        self._headers = {}
        self._field = bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header.lower()] = self._value
        self._header = self._value = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        if self._name != "file":
            self._kind = "field" if filename is None else "skipped"
            return
        if filename is None:
            raise APIError(400, "file: expected a file (a part with a filename), got a form field",
                           code="invalid_request", param="file")  # fmt: skip
        if self.file_started:
            raise APIError(
                400, "file: the form holds more than one file", code="invalid_request", param="file"
            )
        self._kind = "file"
        self.file_started = True
        self.filename = filename.decode("utf-8", "replace")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._kind == "file":
            if self.file_offset is None:
                self.file_offset = self.fed + start
            self._file_bytes.append(data[start:end])
        elif self._kind == "field":
            self._field += data[start:end]
            self._fields_bytes += end - start
            if self._fields_bytes > MAX_FIELDS_BYTES:
                raise APIError(400, f"{self._name}: the form's fields may hold at most {MAX_FIELDS_BYTES} bytes",
                               code="invalid_request", param=self._name or None)  # fmt: skip

    def _part_end(self) -> None:
        if self._kind == "field" and self._name:
            self.fields[self._name] = self._field.decode("utf-8", "replace")


def _boundary(request: Request) -> bytes:
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise APIError(400, "file: the request body must be multipart/form-data (fields file, purpose and "
                       "format)", code="invalid_request", param="file")  # fmt: skip
    return boundary


def _announced_file_size(request: Request, boundary: bytes, file_offset: int) -> int | None:
    """The file's size, from the body's Content-Length, if the file is the form's last part (httpx,
    requests, the OpenAI Python SDK, curl with `-F file=` last, and the console send it so): the body's
    end less the file's start and the closing boundary. A guess for other forms, which IncomingFile
    survives."""
    try:
        length = int(request.headers["content-length"])
    except (KeyError, ValueError):
        return None
    size = length - file_offset - len(b"\r\n--" + boundary + b"--\r\n")
    return size if size >= 0 else None


class _Writer:
    """The file's bytes written in order by one thread of its own, at most WRITES_AHEAD hand-offs ahead of
    the receiving; a failed write is raised by a later `write` or by `drain`."""

    def __init__(self, incoming: IncomingFile) -> None:
        self.incoming = incoming
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="upload-write")
        self._writes: deque[asyncio.Future] = deque()

    async def write(self, data: bytes) -> None:
        if len(self._writes) >= WRITES_AHEAD:
            await self._writes.popleft()
        self._writes.append(
            asyncio.get_running_loop().run_in_executor(self._thread, self.incoming.write, data)
        )

    async def drain(self) -> None:
        while self._writes:
            await self._writes.popleft()
        self._thread.shutdown()

    async def abandon(self) -> None:
        """Wait for the writes handed off (their errors ignored), then drop the file."""
        await asyncio.gather(*self._writes, return_exceptions=True)
        self._writes.clear()
        self._thread.shutdown()
        await run_in_threadpool(self.incoming.discard)


async def receive_form(request: Request, ctx: Context, tenant: str) -> UploadForm:
    """Read the form to its end; the file's bytes are written (in a thread, WRITE_BYTES at a time) while the
    next ones are received. On any failure nothing of the file is kept."""
    parts = _Parts()
    boundary = _boundary(request)
    parser = MultipartParser(boundary, parts.callbacks())
    writer: _Writer | None = None
    pending: list[bytes] = []
    pending_bytes = 0
    try:
        async for chunk in request.stream():
            try:
                parser.write(chunk)
            except MultipartParseError as exc:
                raise APIError(
                    400, f"the multipart body is malformed: {exc}", code="invalid_request"
                ) from None
            parts.fed += len(chunk)
            if parts.file_offset is not None and writer is None:
                size = _announced_file_size(request, boundary, parts.file_offset)
                writer = _Writer(await run_in_threadpool(IncomingFile, ctx, tenant, size))
            data = parts.take()
            if data:
                pending.append(data)
                pending_bytes += len(data)
            if writer is not None and pending_bytes >= WRITE_BYTES:
                await writer.write(b"".join(pending))
                pending, pending_bytes = [], 0
        parser.finalize()
        if parser.state != MultipartState.END:
            raise APIError(400, "the multipart body ends before its closing boundary", code="invalid_request")
        if parts.file_started and writer is None:  # an empty file
            writer = _Writer(await run_in_threadpool(IncomingFile, ctx, tenant))
        if writer is not None:
            if pending:
                await writer.write(b"".join(pending))
            await writer.drain()
    except BaseException:
        if writer is not None:
            await writer.abandon()
        raise
    return UploadForm(fields=parts.fields, file=writer.incoming if writer else None, filename=parts.filename)
