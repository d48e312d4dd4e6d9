"""Storage behaviour, run against both backends: a local directory and moto's S3 server."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import boto3
import pytest

from shared.platform import storage as storage_module
from shared.platform.settings import Settings
from shared.platform.storage import (
    LocalStorage,
    ObjectNotFound,
    S3Storage,
    SizeMismatch,
    Storage,
    StorageError,
    StorageUnavailable,
    StoredObject,
    storage_from_settings,
)
from tests.helpers import S3Server, free_port, wait_for

MIB = 1 << 20


def s3_client(server: S3Server) -> Any:
    """A plain boto3 client of the test S3 server, to look at what a storage call left there."""
    return boto3.client(
        "s3", endpoint_url=server.endpoint_url, region_name="us-east-1",
        aws_access_key_id=server.access_key_id, aws_secret_access_key=server.secret_access_key,
    )  # fmt: skip


class GeneratedStream:
    """A read-only file of `total` bytes made up on demand, one 1 MiB block at a time.

    Each block differs (it is derived from its index), so reordered or duplicated chunks
    change the hash. It records the largest read to show callers never read it whole.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.position = 0
        self.largest_read = 0

    @staticmethod
    def block(index: int) -> bytes:
        return hashlib.sha256(index.to_bytes(8, "big")).digest() * (MIB // 32)

    @classmethod
    def expected_sha256(cls, total: int) -> str:
        digest = hashlib.sha256()
        for index in range(0, total, MIB):
            digest.update(cls.block(index // MIB)[: total - index])
        return digest.hexdigest()

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            raise AssertionError("read() of the whole stream: the caller is not streaming")
        self.largest_read = max(self.largest_read, size)
        parts: list[bytes] = []
        while size > 0 and self.position < self.total:
            index, offset = divmod(self.position, MIB)
            piece = self.block(index)[offset : offset + size][: self.total - self.position]
            parts.append(piece)
            self.position += len(piece)
            size -= len(piece)
        return b"".join(parts)


class FailingStream:
    """Yields `good_bytes` bytes, then raises, like a client that disconnects mid-upload."""

    def __init__(self, good_bytes: int) -> None:
        self.remaining = good_bytes

    def read(self, size: int = -1) -> bytes:
        if self.remaining <= 0:
            raise ConnectionResetError("client went away")
        n = min(size, self.remaining)
        self.remaining -= n
        return b"x" * n


def test_put_stream_returns_size_and_sha256(storage: Storage) -> None:
    data = b"line one\nline two\n" * 1000
    stored = storage.put_stream("tenants/org-default/files/file-abc", io.BytesIO(data))
    assert stored == StoredObject(
        key="tenants/org-default/files/file-abc", size=len(data), sha256=hashlib.sha256(data).hexdigest()
    )


def test_put_file_stores_the_file_and_returns_size_and_sha256(storage: Storage, tmp_path: Path) -> None:
    data = b"line one\nline two\n" * 600_000  # 10.8 MB: more than one S3 part
    source = tmp_path / "upload.jsonl"
    source.write_bytes(data)
    stored = storage.put_file(source, "tenants/org-default/files/file-abc")
    assert stored == StoredObject(
        key="tenants/org-default/files/file-abc", size=len(data), sha256=hashlib.sha256(data).hexdigest()
    )
    assert b"".join(storage.iter_chunks("tenants/org-default/files/file-abc")) == data


def test_large_stream_round_trips_without_reading_it_whole(storage: Storage) -> None:
    total = 20 * MIB + 123
    stream = GeneratedStream(total)
    stored = storage.put_stream("big/file", stream)  # type: ignore[arg-type]
    expected = GeneratedStream.expected_sha256(total)
    assert (stored.size, stored.sha256) == (total, expected)
    assert stream.largest_read <= 8 * MIB
    digest = hashlib.sha256()
    for chunk in storage.iter_chunks("big/file"):
        digest.update(chunk)
    assert digest.hexdigest() == expected


def test_put_bytes_then_get_bytes_round_trips(storage: Storage) -> None:
    storage.put_bytes("a/b.json", b'{"ok": true}')
    assert storage.get_bytes("a/b.json") == b'{"ok": true}'


def test_put_bytes_overwrites(storage: Storage) -> None:
    storage.put_bytes("a/b", b"old")
    storage.put_bytes("a/b", b"new")
    assert storage.get_bytes("a/b") == b"new"


def test_exists_and_size_describe_stored_object(storage: Storage) -> None:
    assert not storage.exists("a/b")
    storage.put_bytes("a/b", b"12345")
    assert storage.exists("a/b")
    assert storage.size("a/b") == 5


def test_iter_chunks_streams_in_bounded_chunks(storage: Storage) -> None:
    data = bytes(range(256)) * (3 * MIB // 256) + b"tail!"
    storage.put_bytes("chunks/data", data)
    chunks = list(storage.iter_chunks("chunks/data", chunk_size=MIB))
    assert len(chunks) >= 4
    assert all(len(chunk) <= MIB for chunk in chunks)
    assert b"".join(chunks) == data


@pytest.mark.parametrize("operation", ["get_bytes", "iter_chunks", "size", "download_file"])
def test_reading_missing_key_raises_object_not_found(
    storage: Storage, operation: str, tmp_path: Path
) -> None:
    with pytest.raises(ObjectNotFound):
        if operation == "download_file":
            storage.download_file("no/such/key", tmp_path / "out")
        else:
            getattr(storage, operation)("no/such/key")  # iter_chunks must raise when called
    assert not (tmp_path / "out").exists()


def test_delete_is_idempotent(storage: Storage) -> None:
    storage.put_bytes("d/key", b"x")
    storage.delete("d/key")
    storage.delete("d/key")
    storage.delete("never/existed")
    assert not storage.exists("d/key")


def test_delete_prefix_removes_only_that_prefix(storage: Storage) -> None:
    for key in ["a/1", "a/b/2", "ab/3", "other/a/4"]:
        storage.put_bytes(key, b"x")
    assert storage.delete_prefix("a/") == 2
    assert storage.list_keys("") == ["ab/3", "other/a/4"]
    assert storage.delete_prefix("a") == 0


def test_delete_prefix_refuses_empty_prefix(storage: Storage) -> None:
    with pytest.raises(ValueError):
        storage.delete_prefix("")


def test_list_keys_is_sorted_and_recursive(storage: Storage) -> None:
    for key in ["p/z", "p/a/b/c", "p/m", "q/x", "pp/y"]:
        storage.put_bytes(key, b"x")
    assert storage.list_keys("p") == ["p/a/b/c", "p/m", "p/z"]
    assert storage.list_keys("p/") == ["p/a/b/c", "p/m", "p/z"]
    assert storage.list_keys("nothing/here") == []


def test_upload_directory_and_download_prefix_round_trip(storage: Storage, tmp_path: Path) -> None:
    source = tmp_path / "adapter"
    files = {
        "adapter_config.json": b"{}",
        "weights/adapter_model.safetensors": b"\x00\x01" * 1000,
        "weights/deeper/notes.txt": b"hello",
    }
    for relative, content in files.items():
        (source / relative).parent.mkdir(parents=True, exist_ok=True)
        (source / relative).write_bytes(content)

    prefix = "tenants/org-default/models/ft-1"
    keys = storage.upload_directory(source, prefix)
    assert keys == sorted(f"{prefix}/{relative}" for relative in files)

    target = tmp_path / "restored"
    paths = storage.download_prefix(prefix, target)
    assert sorted(paths) == sorted(target / relative for relative in files)
    for relative, content in files.items():
        assert (target / relative).read_bytes() == content


def test_upload_file_and_download_file_round_trip(storage: Storage, tmp_path: Path) -> None:
    source = tmp_path / "in.bin"
    source.write_bytes(b"payload" * 100)
    storage.upload_file(source, "files/in.bin")
    storage.download_file("files/in.bin", tmp_path / "out" / "copy.bin")
    assert (tmp_path / "out" / "copy.bin").read_bytes() == b"payload" * 100


@pytest.mark.parametrize("key", ["../x", "/abs", "a//b", "a\\b", "a/./b", "a/", "", "a\x00b"])
def test_invalid_keys_raise_value_error(storage: Storage, key: str, tmp_path: Path) -> None:
    calls = [
        lambda: storage.put_stream(key, io.BytesIO(b"x")),
        lambda: storage.put_bytes(key, b"x"),
        lambda: storage.get_bytes(key),
        lambda: storage.iter_chunks(key),
        lambda: storage.exists(key),
        lambda: storage.size(key),
        lambda: storage.delete(key),
        lambda: storage.download_file(key, tmp_path / "out"),
        lambda: storage.upload_file(tmp_path / "missing", key),
    ]
    for call in calls:
        with pytest.raises(ValueError):
            call()


@pytest.mark.parametrize("prefix", ["../x", "/abs", "a//b", "a\\b"])
def test_invalid_prefixes_raise_value_error(storage: Storage, prefix: str, tmp_path: Path) -> None:
    for call in [
        lambda: storage.list_keys(prefix),
        lambda: storage.delete_prefix(prefix),
        lambda: storage.download_prefix(prefix, tmp_path),
    ]:
        with pytest.raises(ValueError):
            call()


def test_invalid_key_is_refused_before_any_io(tmp_path: Path) -> None:
    # Nothing listens on this endpoint and the local root does not exist: any I/O would
    # fail differently (StorageUnavailable) or create the root.
    unreachable = S3Storage(
        bucket="b",
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        access_key_id="testing",
        secret_access_key="testing",
    )
    local = LocalStorage(tmp_path / "root")
    for backend in (unreachable, local):
        with pytest.raises(ValueError):
            backend.put_bytes("../escape", b"x")
    assert not (tmp_path / "root").exists()
    assert not (tmp_path / "escape").exists()


def test_ping_succeeds(storage: Storage) -> None:
    storage.ping()


def test_s3_ping_raises_storage_unavailable_when_nothing_listens() -> None:
    storage = S3Storage(
        bucket="b",
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        access_key_id="testing",
        secret_access_key="testing",
    )
    with pytest.raises(StorageUnavailable):
        storage.ping()


def test_s3_ping_raises_storage_unavailable_for_missing_bucket(s3_server: S3Server) -> None:
    storage = S3Storage(
        bucket="bucket-that-was-never-created",
        endpoint_url=s3_server.endpoint_url,
        access_key_id=s3_server.access_key_id,
        secret_access_key=s3_server.secret_access_key,
    )
    with pytest.raises(StorageUnavailable):
        storage.ping()


def test_s3_keys_live_under_the_configured_prefix(s3_storage: S3Storage, s3_server: S3Server) -> None:
    s3_storage.put_bytes("files/f1", b"x")
    whole_bucket = S3Storage(
        bucket=s3_storage.bucket,
        endpoint_url=s3_server.endpoint_url,
        access_key_id=s3_server.access_key_id,
        secret_access_key=s3_server.secret_access_key,
    )
    assert whole_bucket.list_keys("") == ["tunery/files/f1"]
    assert s3_storage.list_keys("") == ["files/f1"]


def test_local_failed_write_leaves_no_file(local_storage: LocalStorage) -> None:
    with pytest.raises(ConnectionResetError):
        local_storage.put_stream("files/partial", FailingStream(3 * MIB))  # type: ignore[arg-type]
    assert not local_storage.exists("files/partial")
    assert list((local_storage.root / "files").iterdir()) == []


def test_local_failed_write_keeps_previous_version(local_storage: LocalStorage) -> None:
    local_storage.put_bytes("files/f", b"previous")
    with pytest.raises(ConnectionResetError):
        local_storage.put_stream("files/f", FailingStream(2 * MIB))  # type: ignore[arg-type]
    assert local_storage.get_bytes("files/f") == b"previous"
    assert local_storage.list_keys("files") == ["files/f"]


def test_local_ping_fails_when_root_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "occupied").write_bytes(b"")
    with pytest.raises(StorageUnavailable):
        LocalStorage(tmp_path / "occupied").ping()


def test_storage_from_settings_picks_backend(tmp_path: Path) -> None:
    local = storage_from_settings(Settings(data_dir=tmp_path))
    assert isinstance(local, LocalStorage)
    assert local.root == tmp_path / "storage"
    s3 = storage_from_settings(
        Settings(s3_bucket="bucket", s3_prefix="svc", s3_endpoint_url="http://127.0.0.1:1")
    )
    assert isinstance(s3, S3Storage)
    assert (s3.bucket, s3.prefix) == ("bucket", "svc/")


# -- writers: an object written piece by piece as its bytes arrive ----------------------------------------


@pytest.mark.parametrize("told_size", [False, True], ids=["size unknown", "size told"])
def test_a_writer_stores_the_pieces_written_with_their_size_and_sha256(storage: Storage, told_size: bool):
    total = 20 * MIB + 123  # three S3 parts, the last a short one (told the size, S3 gets one PUT)
    writer = storage.writer("tenants/t/files/written", size=total if told_size else None)
    source = GeneratedStream(total)
    while piece := source.read(MIB // 3):
        writer.write(piece)
    stored = writer.finish()
    assert stored == StoredObject("tenants/t/files/written", total, GeneratedStream.expected_sha256(total))
    assert hashlib.sha256(storage.get_bytes(stored.key)).hexdigest() == stored.sha256


def test_an_object_smaller_than_a_part_is_written_whole(storage: Storage):
    writer = storage.writer("tenants/t/files/small")
    writer.write(b"hello ")
    writer.write(b"world")
    assert writer.finish().size == 11
    assert storage.get_bytes("tenants/t/files/small") == b"hello world"


def test_a_writer_shows_nothing_until_it_finishes_and_an_aborted_one_leaves_nothing(storage: Storage):
    writer = storage.writer("tenants/t/files/aborted")
    writer.write(GeneratedStream(9 * MIB).read(9 * MIB))  # a part already sent, on S3
    assert not storage.exists("tenants/t/files/aborted")
    writer.abort()
    assert storage.list_keys("tenants") == []


def test_an_s3_writer_told_the_size_sends_the_object_in_one_put(s3_storage: S3Storage, s3_server: S3Server):
    total = 20 * MIB + 123
    writer = s3_storage.writer("tenants/t/files/announced", size=total)
    writer.write(GeneratedStream(total).read(total))
    writer.finish()
    head = s3_client(s3_server).head_object(
        Bucket=s3_storage.bucket, Key=s3_storage.prefix + "tenants/t/files/announced"
    )
    assert head["ContentLength"] == total
    assert "-" not in head["ETag"]  # a multipart upload's ETag ends in -<number of parts>


@pytest.mark.parametrize("written", [10, 12])
def test_a_writer_given_another_number_of_bytes_than_its_size_raises_and_stores_nothing(
    storage: Storage, written: int
):
    writer = storage.writer("tenants/t/files/mismatch", size=11)
    with pytest.raises(SizeMismatch):
        writer.write(b"x" * written)
        writer.finish()
    assert storage.list_keys("tenants") == []


def test_a_writer_told_the_size_aborted_after_its_last_byte_leaves_nothing(storage: Storage):
    writer = storage.writer("tenants/t/files/aborted", size=11)
    writer.write(b"hello world")  # the whole body: an S3 PUT may complete before the abort
    writer.abort()
    assert storage.list_keys("tenants") == []


def test_a_streamed_put_left_without_bytes_gives_up_and_its_writer_then_raises(
    s3_storage: S3Storage, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(storage_module, "S3_STREAM_IDLE_SECONDS", 0.2)
    writer = s3_storage.writer("tenants/t/files/idle", size=11)
    # No byte written for longer than the streamed PUT waits for one: its sending thread gives up.
    wait_for(lambda: writer._sent.done(), 10, "the streamed PUT giving up")
    with pytest.raises(StorageError, match="ended before its body was written"):
        writer.write(b"hello world")
    writer.abort()
    assert s3_storage.list_keys("tenants") == []


def test_an_aborted_s3_writer_leaves_no_multipart_upload_behind(s3_storage: S3Storage, s3_server: S3Server):
    writer = s3_storage.writer("tenants/t/files/aborted")
    writer.write(GeneratedStream(9 * MIB).read(9 * MIB))
    writer.abort()
    s3 = s3_client(s3_server)
    assert s3.list_multipart_uploads(Bucket=s3_storage.bucket).get("Uploads", []) == []
