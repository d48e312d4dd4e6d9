"""Dataset containers, read one record at a time within `DataLimits`.

Containers (`detect_container`: by file name, then by the first bytes): JSONL, a JSON array, CSV with a
header row, Parquet, and gzip-compressed JSONL, JSON or CSV (`.gz`).

Hostile input is refused early and in bounded memory: the file is never held whole (lines, JSON array
items and CSV rows are read one at a time up to `DataLimits.max_line_bytes`, a longer one is skipped as
it streams; Parquet is read in batches of rows, row group by row group), JSON nesting is measured before
it is parsed, gzip output is capped in size and in expansion ratio, CSV columns and field sizes are
capped, and a file whose first bytes are not UTF-8 text gets one problem, not one per line.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

CONTAINERS: tuple[str, ...] = ("jsonl", "json", "csv", "parquet", "jsonl.gz", "json.gz", "csv.gz")

_CHUNK = 1 << 16  # bytes read at a time
_HEAD = 1 << 13  # bytes looked at to tell the container and whether the file is text at all
_RATIO_CHECK_AFTER = 8 << 20  # decompressed bytes before the compression ratio is judged
_PARQUET_BATCH_ROWS = 256


@dataclass(frozen=True)
class DataLimits:
    max_line_bytes: int = 1 << 20  # a JSONL line, a JSON array item, a CSV row
    max_columns: int = 256  # CSV and Parquet columns
    max_field_bytes: int = 1 << 20  # one CSV or Parquet cell
    max_depth: int = 64  # JSON nesting (and Parquet type nesting)
    max_decompressed_bytes: int = 10 << 30
    max_compression_ratio: int = 200  # judged once 8 MiB have been decompressed
    min_examples: int = 10
    max_labels: int = 1000  # distinct classification labels


class DataFormatError(ValueError):
    """A dataset (or one of its records) cannot be read as it is; the message names where and why."""


class _UnknownContainer(DataFormatError):
    """Neither the name nor the first bytes say what the file is."""


def detect_container(filename: str, head: bytes) -> str:
    """The container of a file from its name, then from its first bytes (`head`, a few KiB).

    Raises DataFormatError when neither tells, or for a container Tunery does not read.
    """
    name = filename.rsplit("/", 1)[-1].lower()
    if name.endswith((".gz", ".gzip")) or head[:2] == b"\x1f\x8b":
        if head[:2] != b"\x1f\x8b":
            raise DataFormatError("the file is named .gz but is not gzip data")
        inner = _container_of(
            name.rsplit(".", 1)[0] if name.endswith((".gz", ".gzip")) else "", _gunzip_head(head)
        )
        if inner == "parquet":
            raise DataFormatError(
                "gzip-compressed Parquet is not supported: Parquet compresses its own pages; upload the .parquet file"
            )
        return inner + ".gz"
    return _container_of(name, head)


# -- containers -------------------------------------------------------------------------------------

_UNSUPPORTED = {
    ".xlsx": "Excel workbooks",
    ".xls": "Excel workbooks",
    ".zip": "zip archives",
    ".tar": "tar archives",
    ".bz2": "bzip2 files",
    ".xz": "xz files",
    ".zst": "zstd files",
    ".tsv": "tab-separated files",
    ".arrow": "Arrow IPC files",
}
_SUPPORTED_NAMES = ".jsonl, .json, .csv or .parquet (or .jsonl.gz, .json.gz, .csv.gz)"


def _container_of(name: str, head: bytes) -> str:
    extension = "." + name.rsplit(".", 1)[-1] if "." in name else ""
    if head.startswith(b"PAR1") or extension in (".parquet", ".pq"):
        return "parquet"
    if extension in _UNSUPPORTED:
        raise DataFormatError(f"{_UNSUPPORTED[extension]} are not supported; upload {_SUPPORTED_NAMES}")
    if extension == ".csv":
        return "csv"
    body = head[3:] if head.startswith(codecs.BOM_UTF8) else head
    first_line = body.lstrip().split(b"\n", 1)[0].strip()
    first = first_line[:1]
    json_lines = extension in (".jsonl", ".ndjson")
    if json_lines or extension == ".json" or first in (b"[", b"{"):
        if first == b"{" and first_line == b"{":
            raise DataFormatError(
                "the file holds one JSON object spread over several lines; upload a JSON array of examples, "
                "or JSONL with one example per line"
            )
        # A JSON array named .jsonl is a common slip: take it as one when its first line opens an array
        # without closing it; a first line that is a whole array is a (wrong) JSONL record.
        if first == b"[" and not (json_lines and first_line.endswith(b"]")):
            return "json"
        return "jsonl"
    if extension in ("", ".txt") and b"\x00" not in body:
        first_line = body.split(b"\n", 1)[0]
        if b"," in first_line and _utf8_prefix_ok(first_line):
            return "csv"
    raise _UnknownContainer(f"cannot tell what kind of file this is: name it {_SUPPORTED_NAMES}")


def _utf8_prefix_ok(data: bytes) -> bool:
    try:
        codecs.getincrementaldecoder("utf-8")().decode(data, final=False)
    except UnicodeDecodeError:
        return False
    return True


def _gunzip_head(head: bytes) -> bytes:
    try:
        return zlib.decompressobj(wbits=31).decompress(head, _HEAD)
    except zlib.error as exc:
        raise DataFormatError(f"the gzip data is corrupt ({exc})") from None


def _text_problem(head: bytes, complete: bool) -> str | None:
    """One problem for a file that is not UTF-8 text at all, judged from its first bytes (8 KiB).

    A NUL byte or a byte that is not UTF-8 there means binary data or another encoding (Latin-1, UTF-16):
    the whole file needs saving again, so it gets one problem rather than one per line. Further on,
    invalid UTF-8 is a problem of the line, item or row that holds it.
    """
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "the file is UTF-16 text; save it as UTF-8"
    nul = head.find(b"\x00")
    if nul >= 0:
        return (
            f"the file holds binary data, not text (a NUL byte at byte {nul}); upload UTF-8 text or Parquet"
        )
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=complete)
    except UnicodeDecodeError as exc:
        line = head.count(b"\n", 0, exc.start) + 1
        return (
            f"the file is not UTF-8 text (byte {exc.start}, on line {line}, is 0x{head[exc.start]:02x}); "
            "save it as UTF-8"
        )
    return None


class _Readable(Protocol):
    def read(self, n: int, /) -> bytes: ...


class _Chain:
    """Some bytes already read, then the rest of a stream."""

    def __init__(self, head: bytes, rest: _Readable) -> None:
        self._head = memoryview(head)
        self._rest = rest

    def read(self, n: int) -> bytes:
        if self._head:
            out, self._head = bytes(self._head[:n]), self._head[n:]
            return out
        return self._rest.read(n)


def _read_up_to(stream: _Readable, n: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    while size < n:
        data = stream.read(n - size)
        if not data:
            break
        parts.append(data)
        size += len(data)
    return b"".join(parts)


class _Fatal(Exception):
    """The rest of the file cannot be read (the message says why)."""


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


class _BoundedGunzip:
    """gzip decompression that refuses to expand past the limits, whatever the input claims."""

    def __init__(self, raw: _Readable, limits: DataLimits) -> None:
        self._raw = raw
        self._limits = limits
        self._d: Any = None  # the current member's decompressor
        self._pending = b""
        self._consumed = 0  # compressed bytes consumed
        self._produced = 0  # decompressed bytes produced
        self._done = False

    def read(self, n: int) -> bytes:
        while not self._done:
            if not self._pending:
                self._pending = self._raw.read(_CHUNK)
                if not self._pending:
                    if self._d is not None and not self._d.eof:
                        raise _Fatal("the gzip data ends early: the file is truncated")
                    self._done = True
                    break
            if self._d is None or self._d.eof:
                if self._d is not None and not self._pending.strip(b"\x00"):
                    self._pending = b""  # zero padding after the last member
                    continue
                self._d = zlib.decompressobj(wbits=31)  # the next member of a multi-member file
            data = self._pending
            try:
                out = self._d.decompress(data, n)
            except zlib.error as exc:
                raise _Fatal(f"the gzip data is corrupt ({exc})") from None
            left = self._d.unconsumed_tail or (self._d.unused_data if self._d.eof else b"")
            self._consumed += len(data) - len(left)
            self._pending = left
            self._produced += len(out)
            self._check()
            if out:
                return out
        return b""

    def _check(self) -> None:
        limits = self._limits
        if self._produced > limits.max_decompressed_bytes:
            raise _Fatal(
                f"the file decompresses to more than the limit of {_size(limits.max_decompressed_bytes)}"
            )
        ratio = limits.max_compression_ratio
        if self._produced > _RATIO_CHECK_AFTER and self._produced > ratio * max(self._consumed, 1):
            raise _Fatal(
                f"the file expands more than {ratio} times when decompressed, like a compression bomb; "
                "upload it uncompressed"
            )


# -- records: what the containers hold, one at a time -----------------------------------------------


@dataclass
class _Issue:
    text: str
    fatal: bool = False


@dataclass
class _Record:
    source: str
    value: Any


@dataclass
class _Columns:
    names: list[str]
    what: str  # "the header" (CSV) or "the file" (Parquet)


def _issue(source: str | None, message: str, fatal: bool = False) -> _Issue:
    return _Issue(f"{source}: {message}" if source else message, fatal)


_BLANK_RUN = re.compile(rb"(?:[ \t\r]*\n)+")


def _lines(stream: _Readable, max_bytes: int, skip_blank: bool = False) -> Iterator[tuple[int, bytes | None]]:
    """(line number, the line without its newline), or None for a line over the limit, skipped unread;
    with `skip_blank`, runs of blank lines are counted in one step and not yielded (a file of them is cheap)."""
    buffer = bytearray()
    number = 0
    skipping = False
    while chunk := stream.read(_CHUNK):
        start = 0
        while True:
            if skip_blank and not buffer and not skipping and (blank := _BLANK_RUN.match(chunk, start)):
                number += chunk.count(b"\n", start, blank.end())
                start = blank.end()
            newline = chunk.find(b"\n", start)
            if newline < 0:
                if not skipping:
                    buffer += chunk[start:]
                    if len(buffer) > max_bytes:
                        buffer.clear()
                        skipping = True
                break
            number += 1
            if skipping:
                skipping = False
                yield number, None
            else:
                buffer += chunk[start:newline]
                yield number, (bytes(buffer) if len(buffer) <= max_bytes else None)
                buffer.clear()
            start = newline + 1
    if buffer or skipping:
        yield number + 1, None if skipping else bytes(buffer)


_OPENERS = re.compile(rb"[\[{]")
_SKIP_TOKEN = re.compile(r'[\[{]+|[\]}]+|[",]')  # runs of brackets count once: deep nesting is cheap to skip
_SKIP_BUDGET = 1_000_000  # tokens a file's unparseable JSON array items may cost to skip, in all


def _string_end(text: str, i: int, end: int) -> int:
    """Where a JSON string whose body starts at i ends (after its closing quote), or -(where to resume) - 1
    when the text ends first (at a trailing backslash, so that its escape is seen whole)."""
    quote = text.find('"', i, end)
    while True:
        backslash = text.find("\\", i, quote if quote >= 0 else end)
        if backslash < 0:
            return quote + 1 if quote >= 0 else -end - 1
        if backslash + 1 >= end:
            return -backslash - 1
        i = backslash + 2
        if i > quote >= 0:  # that quote was escaped
            quote = text.find('"', i, end)


def _too_deep(value: Any, limit: int) -> bool:
    """Whether parsed JSON nests arrays and objects more than `limit` deep (the outermost is depth 1)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _deep_candidate(value: Any, openers: int, limit: int) -> bool:
    """Nesting deeper than `limit` needs more openers than that: the walk runs only on such records."""
    return openers > limit and isinstance(value, dict | list) and _too_deep(value, limit)


def _json_error(exc: ValueError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return exc.msg
    if "digits" in str(exc):
        return "a number has too many digits"
    return str(exc)


def _jsonl_records(stream: _Readable, limits: DataLimits) -> Iterator[_Record | _Issue]:
    for number, raw in _lines(stream, limits.max_line_bytes, skip_blank=True):
        source = f"line {number}"
        if raw is None:
            yield _issue(source, f"line is longer than the limit of {limits.max_line_bytes} bytes")
            continue
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield _issue(source, f"not valid UTF-8 (byte {exc.start})")
            continue
        try:
            value = json.loads(text)
        except RecursionError:
            yield _issue(source, f"JSON is nested too deeply (more than {limits.max_depth} levels)")
            continue
        except ValueError as exc:
            column = f" at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
            yield _issue(source, f"invalid JSON: {_json_error(exc)}{column}")
            continue
        if _deep_candidate(value, raw.count(b"[") + raw.count(b"{"), limits.max_depth):
            yield _issue(source, f"JSON is nested too deeply (more than {limits.max_depth} levels)")
            continue
        yield _Record(source, value)


_SURROGATE_ESCAPE = re.compile("[\udc80-\udcff]")
_NOT_WHITESPACE = re.compile(r"[^ \t\r\n]")


class _JsonArray:
    """The items of a JSON array, parsed one at a time with `raw_decode` over a bounded text buffer.

    An item is parsed when the buffer holds it whole; one still cut off is retried with twice as much text,
    up to `max_line_bytes`. An item that is too long, too deep or invalid is skipped by a scanner that
    tracks strings and brackets, so that the next item is still read; memory stays under the limit plus a
    read whatever the file holds.
    """

    def __init__(self, stream: _Readable, limits: DataLimits) -> None:
        self._stream = stream
        self._limits = limits
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
        self._json = json.JSONDecoder()
        self._buf = ""
        self._base = 0  # position in the whole text of _buf[0]
        self._eof = False
        self._line = 1  # the line and the position where it starts, counted up to _counted
        self._line_start = 0
        self._counted = 0
        self._skipped_tokens = 0

    def records(self) -> Iterator[_Record | _Issue]:
        try:
            yield from self._items()
        except _Fatal as exc:
            yield _Issue(str(exc), fatal=True)

    # buffer management

    def _fill(self, at_least: int = _CHUNK) -> bool:
        """Read at least `at_least` more bytes (fewer at the end of the file); False at the end."""
        if self._eof:
            return False
        data = _read_up_to(self._stream, at_least)
        if len(data) < at_least:
            self._eof = True
        text = self._decoder.decode(data, final=self._eof)
        if not text and self._eof:
            return False
        self._buf += text
        return True

    def _drop(self, upto: int) -> None:
        """Forget the text before position `upto` of the buffer, counting its lines first."""
        self._count_lines(upto)
        self._buf = self._buf[upto:]
        self._base += upto

    def _compact(self, i: int) -> int:
        """Forget the text before position i once it is most of the buffer (amortized: copying the rest
        for every small item would be quadratic); the position i has after that."""
        if i > _CHUNK and i > len(self._buf) // 2:
            self._drop(i)
            return 0
        return i

    def _count_lines(self, upto: int) -> None:
        start = self._counted - self._base
        if upto > start:
            newlines = self._buf.count("\n", start, upto)
            if newlines:
                self._line += newlines
                self._line_start = self._base + self._buf.rindex("\n", start, upto) + 1
            self._counted = self._base + upto

    def _where(self, i: int) -> str:
        """`line L column C` of position i of the buffer."""
        self._count_lines(i)
        return f"line {self._line} column {self._base + i - self._line_start + 1}"

    def _next_significant(self, i: int) -> int:
        """The position of the next non-whitespace character at or after i, reading on; -1 at the end."""
        while True:
            match = _NOT_WHITESPACE.search(self._buf, i)
            if match:
                return match.start()
            i = len(self._buf)
            if not self._fill():
                return -1

    # items

    def _items(self) -> Iterator[_Record | _Issue]:
        i = self._next_significant(0)
        if i < 0:
            return  # an empty file: no examples
        if self._buf[i] != "[":
            raise _Fatal(f"expected a JSON array at {self._where(i)}")
        number = 0
        i += 1
        while True:
            i = self._next_significant(i)
            if i < 0:
                raise _Fatal(f'the file ends inside the JSON array (no closing "]" after item {number})')
            if self._buf[i] == "]":
                if number:
                    yield _issue(f"item {number}", "invalid JSON: a comma after the last item")
                break
            number += 1
            i, item = self._item(number, self._compact(i))
            yield item
            i = self._next_significant(i)
            if i < 0:
                raise _Fatal(f'the file ends inside the JSON array (no closing "]" after item {number})')
            char = self._buf[i]
            if char == "]":
                break
            if char != ",":
                raise _Fatal(
                    f'item {number}: invalid JSON: expected "," or "]" after the item at {self._where(i)}'
                )
            i += 1
        end = self._next_significant(i + 1)
        if end >= 0:
            raise _Fatal(f"unexpected data after the JSON array at {self._where(end)}")

    def _item(self, number: int, start: int) -> tuple[int, _Record | _Issue]:
        """Parse the item at position `start`: the position after it, and its record or problem."""
        source = f"item {number}"
        limit = self._limits.max_line_bytes
        while True:
            try:
                value, end = self._json.raw_decode(self._buf, start)
            except RecursionError:
                message = self._too_deep()
                return self._skip(f"{source}: {message}", start), _issue(source, message)
            except ValueError as exc:
                if not self._eof and len(self._buf) - start <= limit:
                    self._fill(max(_CHUNK, len(self._buf) - start))  # it may be cut off: read on, 2x as much
                    continue
                position = exc.pos if isinstance(exc, json.JSONDecodeError) else start
                bad = _SURROGATE_ESCAPE.search(self._buf, start, position + 1)
                if bad is not None:
                    message = f"not valid UTF-8 at {self._where(bad.start())}"
                else:
                    message = f"invalid JSON: {_json_error(exc)} at {self._where(position)}"
                if len(self._buf) - start > limit:
                    message = f"item is longer than the limit of {limit} bytes"
                return self._skip(f"{source}: {message}", start), _issue(source, message)
            size = end - start
            if size * 4 > limit and len(self._buf[start:end].encode("utf-8", "surrogateescape")) > limit:
                return end, _issue(source, f"item is longer than the limit of {limit} bytes")
            bad = _SURROGATE_ESCAPE.search(self._buf, start, end)
            if bad is not None:
                return end, _issue(source, f"not valid UTF-8 at {self._where(bad.start())}")
            opened = self._buf.count("[", start, end) + self._buf.count("{", start, end)
            if _deep_candidate(value, opened, self._limits.max_depth):
                return end, _issue(source, self._too_deep())
            return end, _Record(source, value)

    def _too_deep(self) -> str:
        return f"JSON is nested too deeply (more than {self._limits.max_depth} levels)"

    def _skip(self, problem: str, start: int) -> int:
        """Scan past the item at position `start` without parsing it: the position after it.

        Strings are skipped with `str.find`, runs of brackets as one token, and the tokens this costs are
        counted over the whole file: past `_SKIP_BUDGET` the file is refused rather than ground through.
        """
        depth = 0
        in_string = False
        i = start
        while True:
            if in_string:
                after = _string_end(self._buf, i, len(self._buf))
                if after >= 0:
                    in_string = False
                    i = after
                    continue
                i = -after - 1
            else:
                match = _SKIP_TOKEN.search(self._buf, i)
                if match is not None:
                    self._skipped_tokens += 1
                    if self._skipped_tokens > _SKIP_BUDGET:
                        raise _Fatal(
                            f"{problem}; stopped reading: too much of the JSON array cannot be parsed"
                        )
                    token = match[0]
                    i = match.end()
                    if token == '"':
                        in_string = True
                    elif token == ",":
                        if depth == 0:
                            return match.start()
                    elif token[0] in "[{":
                        depth += len(token)
                    elif len(token) <= depth:
                        depth -= len(token)
                    else:  # this run closes the item and goes one past it
                        end = match.start() + depth
                        if self._buf[end] == "]":
                            return end
                        raise _Fatal(f'{problem}; then an unexpected "}}" at {self._where(end)}')
                    continue
                i = len(self._buf)
            # the buffer is used up: keep only what is still needed (a trailing backslash) and read on
            self._drop(i)
            i = 0
            if not self._fill():
                raise _Fatal('the file ends inside the JSON array (no closing "]")')


def _csv_records(stream: _Readable, limits: DataLimits) -> Iterator[_Record | _Issue | _Columns]:
    # csv's own field limit is process-wide; it is raised (never lowered) so that this module's limits,
    # which are per call, are the ones that apply.
    if csv.field_size_limit() < limits.max_line_bytes:
        csv.field_size_limit(limits.max_line_bytes)
    state = {"bytes": 0, "too_long": False, "bad_utf8": -1}
    row_number = 0

    def lines() -> Iterator[str]:
        for _, raw in _lines(stream, limits.max_line_bytes):
            if raw is None:
                state["too_long"] = True
                yield "\n"
                continue
            state["bytes"] += len(raw) + 1
            if state["bytes"] > limits.max_line_bytes:
                raise _Fatal(
                    f"row {row_number + 1}: a quoted field runs on for more than {limits.max_line_bytes} "
                    'bytes (is a closing " missing?)'
                )
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                if state["bad_utf8"] < 0:
                    state["bad_utf8"] = exc.start
                text = raw.decode("utf-8", "replace")
            yield text + "\n"

    reader = csv.reader(lines(), strict=True)
    header: list[str] | None = None
    try:
        while True:
            state.update(bytes=0, too_long=False, bad_utf8=-1)
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                row_number += 1
                message = str(exc)
                if "end of data" in message:
                    message += ' (is a closing " missing?)'
                yield _issue(f"row {row_number}", f"invalid CSV: {message}")
                continue
            if header is None:
                if not row or not any(cell.strip() for cell in row):
                    if state["too_long"]:
                        raise _Fatal(f"the header is longer than the limit of {limits.max_line_bytes} bytes")
                    continue  # blank lines before the header
                if state["bad_utf8"] >= 0:
                    raise _Fatal(f"the header is not valid UTF-8 (byte {state['bad_utf8']})")
                header = [cell.strip() for cell in row]
                problem = _header_problem(header, limits)
                if problem:
                    raise _Fatal(problem)
                yield _Columns(header, "the header")
                continue
            if not row and not state["too_long"]:
                continue  # a blank line
            row_number += 1
            source = f"row {row_number}"
            if state["too_long"]:
                yield _issue(source, f"row is longer than the limit of {limits.max_line_bytes} bytes")
                continue
            if state["bad_utf8"] >= 0:
                yield _issue(source, f"not valid UTF-8 (byte {state['bad_utf8']} of a line)")
                continue
            if len(row) != len(header):
                yield _issue(source, f"{len(row)} fields, but the header has {len(header)} columns")
                continue
            too_big = _oversized_cell(header, row, limits.max_field_bytes)
            if too_big:
                yield _issue(source, f"{too_big}: longer than the limit of {limits.max_field_bytes} bytes")
                continue
            yield _Record(source, dict(zip(header, row, strict=True)))
    except _Fatal as exc:
        yield _Issue(str(exc), fatal=True)


def _header_problem(header: list[str], limits: DataLimits) -> str | None:
    if len(header) > limits.max_columns:
        return f"the header has {len(header)} columns; at most {limits.max_columns} are allowed"
    seen: set[str] = set()
    for i, name in enumerate(header):
        if not name:
            return f"the header's column {i + 1} has no name"
        if name in seen:
            return f'the header names the column "{name}" twice'
        seen.add(name)
    return None


def _oversized_cell(names: list[str], cells: list[Any], limit: int) -> str | None:
    for name, cell in zip(names, cells, strict=True):
        if isinstance(cell, str) and len(cell) > limit // 4 and len(cell.encode()) > limit:
            return name
    return None


def _parquet_records(f: BinaryIO, limits: DataLimits) -> Iterator[_Record | _Issue | _Columns]:
    try:
        yield from _parquet_rows(f, limits)
    except _Fatal as exc:
        yield _Issue(str(exc), fatal=True)


def _parquet_rows(f: BinaryIO, limits: DataLimits) -> Iterator[_Record | _Issue | _Columns]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        raise _Fatal("Parquet files cannot be read here: pyarrow is not installed") from None
    if not f.seekable():
        raise _Fatal("a Parquet file must be read from a seekable file")
    size = f.seek(0, 2)
    f.seek(0)
    try:
        parquet = pq.ParquetFile(f, buffer_size=_CHUNK * 16)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise _Fatal(f"not a readable Parquet file ({exc})") from None
    schema = parquet.schema_arrow
    if len(schema.names) > limits.max_columns:
        raise _Fatal(f"the file has {len(schema.names)} columns; at most {limits.max_columns} are allowed")
    for column in schema:
        if _arrow_depth(pa, column.type) > limits.max_depth:
            raise _Fatal(f'column "{column.name}" is nested too deeply (more than {limits.max_depth} levels)')
    metadata = parquet.metadata
    expanded = sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
    if expanded > limits.max_decompressed_bytes:
        raise _Fatal(
            f"the file decompresses to more than the limit of {_size(limits.max_decompressed_bytes)}"
        )
    ratio = limits.max_compression_ratio
    if expanded > _RATIO_CHECK_AFTER and expanded > ratio * max(size, 1):
        raise _Fatal(f"the file expands more than {ratio} times when decompressed, like a compression bomb")
    names = list(schema.names)
    yield _Columns(names, "the file")
    number = 0
    for group in range(metadata.num_row_groups):
        try:
            batches = parquet.iter_batches(
                batch_size=_PARQUET_BATCH_ROWS, row_groups=[group], use_threads=False
            )
            for batch in batches:
                for row in batch.to_pylist():
                    number += 1
                    too_big = _oversized_cell(names, [row[name] for name in names], limits.max_field_bytes)
                    if too_big:
                        yield _issue(
                            f"row {number}",
                            f"{too_big}: longer than the limit of {limits.max_field_bytes} bytes",
                        )
                        continue
                    yield _Record(f"row {number}", _drop_nulls(row))
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise _Fatal(f"row group {group + 1} cannot be read ({exc})") from None


def _arrow_depth(pa: Any, arrow_type: Any) -> int:
    if pa.types.is_struct(arrow_type):
        return 1 + max(
            (_arrow_depth(pa, arrow_type.field(i).type) for i in range(arrow_type.num_fields)), default=0
        )
    if (
        pa.types.is_list(arrow_type)
        or pa.types.is_large_list(arrow_type)
        or pa.types.is_fixed_size_list(arrow_type)
    ):
        return 1 + _arrow_depth(pa, arrow_type.value_type)
    if pa.types.is_map(arrow_type):
        return 1 + max(_arrow_depth(pa, arrow_type.key_type), _arrow_depth(pa, arrow_type.item_type))
    return 0


def _drop_nulls(value: Any) -> Any:
    """Parquet gives every struct all its fields, null where a record had none: leave those out."""
    if isinstance(value, dict):
        return {key: _drop_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_drop_nulls(item) for item in value]
    return value
