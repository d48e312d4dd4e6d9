"""Object storage: one small interface, a local-directory backend and an S3 backend.

The API streams uploads into it, the trainer and evaluator read datasets and write
adapters through it. Keys are built by the server (`tenants/<org>/files/<id>`), but every
key is still validated so that no client-influenced string can make a backend touch a
path outside its root or bucket prefix.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)

if TYPE_CHECKING:
    from shared.platform.settings import Settings

CHUNK_SIZE = 1 << 20
S3_PART_SIZE = 8 << 20
# Parts of an ObjectWriter sent at once while the next fills: memory holds at most this many parts and the
# one filling (24 MiB).
S3_PARTS_IN_FLIGHT = 2
# A writer told its object's size sends it as one PUT streamed from the writes, up to S3's limit for one PUT
# (larger objects go in parts); at most this many bytes wait in memory to be sent.
S3_MAX_PUT_BYTES = 5 << 30
S3_STREAM_BUFFER_BYTES = 16 << 20
S3_STREAM_IDLE_SECONDS = 300.0
S3_DELETE_BATCH = 1000
# Local temp files share the target's directory (so os.replace is atomic) and are hidden from listings.
_TMP_PREFIX = ".tmp-"
_TMP_SUFFIX = ".partial"


class StorageError(Exception):
    """Any storage failure the caller may want to report as a server error."""


class ObjectNotFound(StorageError):
    """The key does not exist."""


class SizeMismatch(StorageError):
    """A writer told its object's size was given another number of bytes: nothing was stored."""


class StorageUnavailable(StorageError):
    """The backend cannot be reached (used by readiness checks)."""


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    sha256: str


def validate_key(key: str) -> str:
    """Refuse keys that could escape the storage root; both backends call this before any I/O."""
    if not isinstance(key, str) or not key:
        raise ValueError("storage key must be a non-empty string")
    if "\x00" in key:
        raise ValueError(f"storage key contains NUL: {key!r}")
    if "\\" in key:
        raise ValueError(f"storage key contains a backslash: {key!r}")
    if key.startswith("/"):
        raise ValueError(f"storage key must be relative: {key!r}")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise ValueError(f"storage key has an empty, '.' or '..' segment: {key!r}")
    return key


def normalise_prefix(prefix: str) -> str:
    """Turn a prefix into `a/b/` (or `` for everything) so `a` never matches `ab/...`."""
    if prefix == "":
        return ""
    stripped = prefix[:-1] if prefix.endswith("/") else prefix
    return validate_key(stripped) + "/"


class _HashingReader:
    """Read-only wrapper that hashes and counts bytes as the uploader pulls them.

    It deliberately has no seek/tell, so boto3 treats it as a one-pass stream. `read(n)`
    fills up to n bytes even if the underlying stream returns short reads, because S3
    rejects non-final multipart parts under 5 MiB.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._hash = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            data = self._stream.read() or b""
        else:
            parts: list[bytes] = []
            remaining = size
            while remaining > 0:
                chunk = self._stream.read(remaining)
                if not chunk:
                    break
                parts.append(chunk)
                remaining -= len(chunk)
            data = b"".join(parts)
        self._hash.update(data)
        self.size += len(data)
        return data

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class ObjectWriter(ABC):
    """A new object written piece by piece as its bytes arrive (an upload being received), hashed and
    counted on the way, so that storing it needs no pass of its own. Nothing is visible under the key
    until `finish`; `abort` leaves nothing behind. A writer told the object's `size` raises SizeMismatch
    (and keeps nothing) when another number of bytes comes."""

    def __init__(self, key: str, size: int | None = None) -> None:
        self.key = validate_key(key)
        self.size = 0
        self.expected_size = size
        self._hash = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self._hash.update(data)
        self.size += len(data)
        if self.expected_size is not None and self.size > self.expected_size:
            self.abort()
            raise SizeMismatch(f"{self.key}: more than the {self.expected_size} bytes announced")
        self._write(data)

    def finish(self) -> StoredObject:
        if self.expected_size is not None and self.size != self.expected_size:
            self.abort()
            raise SizeMismatch(f"{self.key}: {self.size} bytes written, {self.expected_size} announced")
        self._finish()
        return StoredObject(key=self.key, size=self.size, sha256=self._hash.hexdigest())

    @abstractmethod
    def _write(self, data: bytes) -> None: ...

    @abstractmethod
    def _finish(self) -> None: ...

    @abstractmethod
    def abort(self) -> None:
        """Drop everything written so far."""


class Storage(ABC):
    """What services need from object storage; keys use forward slashes on every backend."""

    @abstractmethod
    def put_stream(self, key: str, stream: BinaryIO) -> StoredObject:
        """Store everything readable from `stream` without holding it all in memory."""

    @abstractmethod
    def writer(self, key: str, size: int | None = None) -> ObjectWriter:
        """A writer of a new object under `key`, for bytes that arrive a piece at a time. `size`: the
        object's size when known ahead, which lets a backend stream it whole (S3: one PUT instead of parts
        stored and then assembled); writing another number of bytes then raises SizeMismatch, and nothing
        is stored."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def iter_chunks(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """Open the object now (raising ObjectNotFound here, not on first next()) and stream it."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def size(self, key: str) -> int: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the key; a missing key is not an error."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Remove every key below `prefix` and return how many were removed."""

    @abstractmethod
    def list_keys(self, prefix: str) -> list[str]:
        """Full keys below `prefix` (recursive), sorted."""

    @abstractmethod
    def ping(self) -> None:
        """Raise StorageUnavailable when the backend cannot be used."""

    def put_bytes(self, key: str, data: bytes) -> None:
        self.put_stream(key, BytesIO(data))

    def put_file(self, path: Path, key: str) -> StoredObject:
        """Store the local file at `path`."""
        validate_key(key)
        with open(path, "rb") as f:
            return self.put_stream(key, f)

    def upload_file(self, path: Path, key: str) -> None:
        self.put_file(path, key)

    def download_file(self, key: str, path: Path) -> None:
        """Stream to a temp file next to `path`, then rename, so readers never see half a file."""
        chunks = self.iter_chunks(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=_TMP_PREFIX, suffix=_TMP_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    out.write(chunk)
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise

    def download_prefix(self, prefix: str, directory: Path) -> list[Path]:
        """Copy every key below `prefix` into `directory`, keeping the layout below the prefix."""
        base = normalise_prefix(prefix)
        paths: list[Path] = []
        for key in self.list_keys(prefix):
            target = directory.joinpath(*key[len(base) :].split("/"))
            self.download_file(key, target)
            paths.append(target)
        return paths

    def upload_directory(self, directory: Path, prefix: str) -> list[str]:
        """Upload every file below `directory` to `prefix/<relative path>`; returns the keys, sorted."""
        base = normalise_prefix(prefix)
        keys: list[str] = []
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            key = validate_key(base + path.relative_to(directory).as_posix())
            self.upload_file(path, key)
            keys.append(key)
        return keys


class _LocalWriter(ObjectWriter):
    """A temp file beside the target, renamed onto it when finished."""

    def __init__(self, key: str, size: int | None, path: Path, fd: int, tmp_name: str) -> None:
        super().__init__(key, size)
        self._path = path
        self._tmp_name = tmp_name
        self._out = os.fdopen(fd, "wb")

    def _write(self, data: bytes) -> None:
        self._out.write(data)

    def _finish(self) -> None:
        try:
            self._out.flush()
            os.fsync(self._out.fileno())
            self._out.close()
            os.replace(self._tmp_name, self._path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        self._out.close()
        Path(self._tmp_name).unlink(missing_ok=True)


class LocalStorage(Storage):
    """Files under a root directory: the embedded single-machine default."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    def put_stream(self, key: str, stream: BinaryIO) -> StoredObject:
        path = self._path(key)
        fd, tmp_name = self._make_temp(path.parent)
        digest = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := stream.read(CHUNK_SIZE):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        return StoredObject(key=key, size=size, sha256=digest.hexdigest())

    def writer(self, key: str, size: int | None = None) -> ObjectWriter:
        path = self._path(key)
        fd, tmp_name = self._make_temp(path.parent)
        return _LocalWriter(key, size, path, fd, tmp_name)

    @staticmethod
    def _make_temp(directory: Path) -> tuple[int, str]:
        """Create the temp file, retrying if a concurrent delete_prefix pruned the directory."""
        for _ in range(3):
            directory.mkdir(parents=True, exist_ok=True)
            try:
                return tempfile.mkstemp(dir=directory, prefix=_TMP_PREFIX, suffix=_TMP_SUFFIX)
            except FileNotFoundError:
                continue
        raise StorageError(f"could not create a temporary file in {directory}")

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ObjectNotFound(key) from exc

    def iter_chunks(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        path = self._path(key)
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed by the generator below
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ObjectNotFound(key) from exc
        return self._read_chunks(f, chunk_size)

    @staticmethod
    def _read_chunks(f: BinaryIO, chunk_size: int) -> Iterator[bytes]:
        with f:
            while chunk := f.read(chunk_size):
                yield chunk

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(key)
        return path.stat().st_size

    def delete(self, key: str) -> None:
        path = self._path(key)
        if path.is_file():
            path.unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        base = normalise_prefix(prefix)
        if not base:
            raise ValueError("refusing to delete the whole store: give a non-empty prefix")
        keys = self.list_keys(prefix)
        for key in keys:
            self._path(key).unlink(missing_ok=True)
        # Prune the now-empty directories, deepest first; rmdir leaves non-empty ones alone.
        top = self.root.joinpath(*base.rstrip("/").split("/"))
        if top.is_dir():
            for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda w: len(w[0]), reverse=True):
                with suppress(OSError):
                    os.rmdir(dirpath)
        return len(keys)

    def list_keys(self, prefix: str) -> list[str]:
        base = normalise_prefix(prefix)
        top = self.root.joinpath(*base.rstrip("/").split("/")) if base else self.root
        if not top.is_dir():
            return []
        keys: list[str] = []
        for dirpath, _dirs, files in os.walk(top):
            for name in files:
                if name.startswith(_TMP_PREFIX) and name.endswith(_TMP_SUFFIX):
                    continue
                keys.append(Path(dirpath, name).relative_to(self.root).as_posix())
        return sorted(keys)

    def ping(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageUnavailable(f"cannot create storage root {self.root}: {exc}") from exc
        if not self.root.is_dir() or not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageUnavailable(f"storage root {self.root} is not a writable directory")


_MISSING_CODES = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
_CONNECTION_ERRORS = (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError)


@contextmanager
def _s3_errors(what: str) -> Iterator[None]:
    """Translate botocore exceptions into the storage error hierarchy."""
    try:
        yield
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in _MISSING_CODES:
            raise ObjectNotFound(what) from exc
        raise StorageError(f"S3 error on {what}: {exc}") from exc
    except _CONNECTION_ERRORS as exc:
        raise StorageUnavailable(f"S3 unreachable ({what}): {exc}") from exc
    except BotoCoreError as exc:
        raise StorageError(f"S3 error on {what}: {exc}") from exc


class _S3Writer(ObjectWriter):
    """Bytes gathered into parts of S3_PART_SIZE, each sent from a thread of its own while the next fills,
    so that the object is stored about as soon as its last byte arrives. An object smaller than a part is
    one PUT; memory holds the part filling and at most S3_PARTS_IN_FLIGHT parts being sent."""

    def __init__(self, key: str, size: int | None, client: Any, bucket: str, full_key: str) -> None:
        super().__init__(key, size)
        self._client = client
        self._bucket = bucket
        self._full_key = full_key
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._sending: deque[Future[dict]] = deque()
        self._parts: list[dict] = []
        self._senders = ThreadPoolExecutor(S3_PARTS_IN_FLIGHT, thread_name_prefix="s3-part")

    def _write(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= S3_PART_SIZE:
            with memoryview(self._buffer) as view:
                part = bytes(view[:S3_PART_SIZE])  # one copy: a slice of the bytearray would be a second
            del self._buffer[:S3_PART_SIZE]
            self._send(part)

    def _send(self, part: bytes) -> None:
        """Send `part` from a sender thread once one is free (waiting for the oldest part sent first)."""
        with _s3_errors(self.key):
            if self._upload_id is None:
                created = self._client.create_multipart_upload(Bucket=self._bucket, Key=self._full_key)
                self._upload_id = created["UploadId"]
            if len(self._sending) >= S3_PARTS_IN_FLIGHT:
                self._parts.append(self._sending.popleft().result())
        self._sending.append(
            self._senders.submit(self._send_part, len(self._parts) + len(self._sending) + 1, part)
        )

    def _send_part(self, number: int, part: bytes) -> dict:
        with _s3_errors(self.key):
            answer = self._client.upload_part(
                Bucket=self._bucket,
                Key=self._full_key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=part,
            )
        return {"PartNumber": number, "ETag": answer["ETag"]}

    def _finish(self) -> None:
        try:
            if self._upload_id is None:
                with _s3_errors(self.key):
                    self._client.put_object(Bucket=self._bucket, Key=self._full_key, Body=bytes(self._buffer))
            else:
                if self._buffer:
                    self._send(bytes(self._buffer))
                while self._sending:
                    self._parts.append(self._sending.popleft().result())
                with _s3_errors(self.key):
                    self._client.complete_multipart_upload(
                        Bucket=self._bucket, Key=self._full_key, UploadId=self._upload_id,
                        MultipartUpload={"Parts": self._parts},
                    )  # fmt: skip
        except BaseException:
            self.abort()
            raise
        self._buffer = bytearray()
        self._senders.shutdown()

    def abort(self) -> None:
        for sending in self._sending:
            sending.cancel()
        self._senders.shutdown(wait=True)
        self._sending.clear()
        self._buffer = bytearray()
        if self._upload_id is not None:
            # Best effort: parts of an upload never completed are not objects, and a bucket's lifecycle
            # rule (AbortIncompleteMultipartUpload) removes any left.
            with suppress(ClientError, BotoCoreError):
                self._client.abort_multipart_upload(
                    Bucket=self._bucket, Key=self._full_key, UploadId=self._upload_id
                )
            self._upload_id = None


class _PipeBody:
    """A streamed PUT's body: the sending thread reads what the writing thread puts, waiting for it; the
    writer waits while S3_STREAM_BUFFER_BYTES are queued. `fail` breaks off the read (and so the PUT)."""

    def __init__(self) -> None:
        self._chunks: deque[memoryview] = deque()
        self._queued = 0
        self._closed = False
        self._failure: BaseException | None = None
        self._reader_done = False
        self._changed = threading.Condition()

    def put(self, data: bytes) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._queued < S3_STREAM_BUFFER_BYTES or self._reader_done)
            if self._reader_done:
                raise StorageError("the streamed PUT ended before its body was written")
            self._chunks.append(memoryview(data))
            self._queued += len(data)
            self._changed.notify_all()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def fail(self, failure: BaseException) -> None:
        with self._changed:
            self._failure = failure
            self._changed.notify_all()

    def reader_done(self) -> None:
        with self._changed:
            self._reader_done = True
            self._changed.notify_all()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        with self._changed:
            arrived = self._changed.wait_for(
                lambda: self._chunks or self._closed or self._failure is not None, S3_STREAM_IDLE_SECONDS
            )
            if not arrived:  # a writer left without finishing or aborting: the PUT must not wait forever
                raise StorageError(f"no bytes to stream for {S3_STREAM_IDLE_SECONDS} s")
            if self._failure is not None:
                raise self._failure
            if not self._chunks:
                return b""
            chunk = self._chunks.popleft()
            if 0 <= size < len(chunk):
                chunk, rest = chunk[:size], chunk[size:]
                self._chunks.appendleft(rest)
            self._queued -= len(chunk)
            self._changed.notify_all()
            return bytes(chunk)


class _S3StreamWriter(ObjectWriter):
    """An object of a size known ahead, sent as one PUT whose body is read from the writes as they come
    (from a thread of its own): S3 receives the bytes once, where parts are received and then assembled
    (moto copies them again). Memory holds at most S3_STREAM_BUFFER_BYTES waiting to be sent."""

    def __init__(self, key: str, client: Any, bucket: str, full_key: str, size: int) -> None:
        super().__init__(key, size)
        self._client = client
        self._bucket = bucket
        self._full_key = full_key
        self._body = _PipeBody()
        self._sender = ThreadPoolExecutor(1, thread_name_prefix="s3-put")
        self._sent = self._sender.submit(self._put)

    def _put(self) -> None:
        try:
            with _s3_errors(self.key):
                self._client.put_object(
                    Bucket=self._bucket, Key=self._full_key, Body=self._body, ContentLength=self.expected_size
                )
        finally:
            self._body.reader_done()

    def _write(self, data: bytes) -> None:
        self._body.put(data)

    def _finish(self) -> None:
        self._body.close()
        try:
            self._sent.result()
        except BaseException:
            self.abort()
            raise
        self._sender.shutdown()

    def abort(self) -> None:
        self._body.fail(StorageError(f"{self.key}: upload abandoned"))
        try:
            self._sent.result()
        except BaseException:  # broken off, as asked
            pass
        else:  # every byte had gone out: the object exists and must not
            with suppress(ClientError, BotoCoreError):
                self._client.delete_object(Bucket=self._bucket, Key=self._full_key)
        self._sender.shutdown()


def _no_expect_continue(params: dict, **kwargs: Any) -> None:
    """botocore asks S3 whether to send a body read from a file object (Expect: 100-continue) and waits up
    to a second for the answer, which some S3-compatible servers never give; a streamed PUT's body is
    already on its way, so it is sent at once."""
    params.get("headers", {}).pop("Expect", None)


class S3Storage(Storage):
    """Objects in an S3 (or S3-compatible) bucket, under an optional key prefix."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = normalise_prefix(prefix)
        self.region = region
        # "when_required" checksums: S3-compatible stores (MinIO, older Ceph, moto) reject or
        # ignore the CRC trailers newer botocore sends by default.
        config = Config(
            region_name=region,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"mode": "standard", "max_attempts": 5},
            connect_timeout=5,
            read_timeout=60,
        )
        session = boto3.session.Session(
            aws_access_key_id=access_key_id, aws_secret_access_key=secret_access_key
        )
        self._client: Any = session.client("s3", endpoint_url=endpoint_url, config=config)
        # Readiness probes must answer quickly, so ping does not retry with backoff.
        ping_config = config.merge(Config(retries={"mode": "standard", "max_attempts": 1}, read_timeout=10))
        self._ping_client: Any = session.client("s3", endpoint_url=endpoint_url, config=ping_config)
        self._transfer = TransferConfig(multipart_threshold=S3_PART_SIZE, multipart_chunksize=S3_PART_SIZE)
        # A streamed PUT's body is read once, as it arrives: botocore must not read it first to sign it (it
        # would over plain http; over https it never signs bodies), nor retry it (it cannot rewind).
        stream_config = config.merge(
            Config(s3={"payload_signing_enabled": False}, retries={"mode": "standard", "max_attempts": 1})
        )
        self._stream_client: Any = session.client("s3", endpoint_url=endpoint_url, config=stream_config)
        self._stream_client.meta.events.register("before-call.s3.PutObject", _no_expect_continue)

    def _full(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def ensure_bucket(self) -> None:
        """Create the bucket if missing; only tests and `tunery up` dev setups call this."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) not in _MISSING_CODES:
                raise StorageError(f"cannot check bucket {self.bucket}: {exc}") from exc
        except _CONNECTION_ERRORS as exc:
            raise StorageUnavailable(f"S3 unreachable: {exc}") from exc
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self._client.create_bucket(**kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise StorageError(f"cannot create bucket {self.bucket}: {exc}") from exc

    def put_stream(self, key: str, stream: BinaryIO) -> StoredObject:
        full = self._full(key)
        reader = _HashingReader(stream)
        with _s3_errors(key):
            self._client.upload_fileobj(reader, self.bucket, full, Config=self._transfer)
        return StoredObject(key=key, size=reader.size, sha256=reader.hexdigest())

    def writer(self, key: str, size: int | None = None) -> ObjectWriter:
        if size is not None and size <= S3_MAX_PUT_BYTES:
            return _S3StreamWriter(key, self._stream_client, self.bucket, self._full(key), size)
        return _S3Writer(key, size, self._client, self.bucket, self._full(key))

    def put_file(self, path: Path, key: str) -> StoredObject:
        """Sent from the file itself, which boto3 reads part by part as it sends them, so memory holds a few
        parts; from a stream it cannot seek (put_stream's hashing reader) it buffers up to ten parts ahead.
        The hash is a pass of its own over the file."""
        full = self._full(key)
        with open(path, "rb") as f:
            sha256 = hashlib.file_digest(f, "sha256").hexdigest()
            size = f.tell()
        with _s3_errors(key):
            self._client.upload_file(str(path), self.bucket, full, Config=self._transfer)
        return StoredObject(key=key, size=size, sha256=sha256)

    def put_bytes(self, key: str, data: bytes) -> None:
        full = self._full(key)
        with _s3_errors(key):
            self._client.put_object(Bucket=self.bucket, Key=full, Body=data)

    def get_bytes(self, key: str) -> bytes:
        full = self._full(key)
        with _s3_errors(key):
            body = self._client.get_object(Bucket=self.bucket, Key=full)["Body"]
            try:
                return body.read()
            finally:
                body.close()

    def iter_chunks(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        full = self._full(key)
        with _s3_errors(key):
            body = self._client.get_object(Bucket=self.bucket, Key=full)["Body"]
        return self._read_chunks(body, key, chunk_size)

    @staticmethod
    def _read_chunks(body: Any, key: str, chunk_size: int) -> Iterator[bytes]:
        try:
            with _s3_errors(key):
                yield from body.iter_chunks(chunk_size)
        finally:
            body.close()

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except ObjectNotFound:
            return False
        return True

    def size(self, key: str) -> int:
        full = self._full(key)
        with _s3_errors(key):
            return int(self._client.head_object(Bucket=self.bucket, Key=full)["ContentLength"])

    def delete(self, key: str) -> None:
        full = self._full(key)
        with _s3_errors(key):
            self._client.delete_object(Bucket=self.bucket, Key=full)

    def delete_prefix(self, prefix: str) -> int:
        if not normalise_prefix(prefix):
            raise ValueError("refusing to delete the whole store: give a non-empty prefix")
        keys = self.list_keys(prefix)
        for start in range(0, len(keys), S3_DELETE_BATCH):
            batch = [{"Key": self.prefix + k} for k in keys[start : start + S3_DELETE_BATCH]]
            with _s3_errors(prefix):
                response = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
            if response.get("Errors"):
                raise StorageError(f"S3 refused to delete some keys below {prefix}: {response['Errors'][:3]}")
        return len(keys)

    def list_keys(self, prefix: str) -> list[str]:
        full_prefix = self.prefix + normalise_prefix(prefix)
        keys: list[str] = []
        paginator = self._client.get_paginator("list_objects_v2")
        with _s3_errors(prefix or "<root>"):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
                keys.extend(obj["Key"][len(self.prefix) :] for obj in page.get("Contents", []))
        return sorted(keys)

    def ping(self) -> None:
        try:
            self._ping_client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as exc:
            raise StorageUnavailable(f"S3 bucket {self.bucket} not usable: {exc}") from exc


def storage_from_settings(settings: Settings) -> Storage:
    """S3 when a bucket is configured, otherwise the local directory."""
    if settings.s3_bucket:
        return S3Storage(
            bucket=settings.s3_bucket,
            prefix=settings.s3_prefix,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=settings.s3_secret_access_key,
        )
    return LocalStorage(settings.resolved_storage_path)
