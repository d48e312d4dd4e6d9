"""Training datasets in every format Tunery accepts: read in a streaming pass, validated, converted into one
internal form (`Example`) that the trainer consumes.

Containers (`detect_container`: by file name, then by the first bytes): JSONL, a JSON array, CSV with a
header row, Parquet, and gzip-compressed JSONL, JSON or CSV (`.gz`). Formats (`detect_format`: from the
keys of the first record that has a known shape, or forced with `format=`), one per file:

| format            | a record                                                        | becomes (kind)  |
|-------------------|-----------------------------------------------------------------|-----------------|
| chat              | `messages` [{role, content, weight?, ...}], `tools`?            | chat            |
| prompt_completion | `prompt`, `completion`                                          | chat: user, assistant |
| alpaca            | `instruction`, `input`?, `output`, `system`?, `history`?        | chat: [system], [history], user, assistant |
| sharegpt          | `conversations` [{from, value}], `system`?, `tools`?            | chat (human→user, gpt→assistant, system, function_call→assistant, observation→tool) |
| text              | `text`                                                          | text            |
| classification    | `text`, `label` (string or integer)                             | classification  |
| preference        | `input` {messages}, `preferred_output`, `non_preferred_output` (OpenAI DPO); `prompt`, `chosen`, `rejected` (strings or message lists); `conversations` + `chosen`/`rejected` {from, value} (LLaMA-Factory) | preference: prompt messages, chosen, rejected |

Every converted chat example satisfies `file_validation.chat_example_problem`, and so does each of a
preference example's prompt + chosen and prompt + rejected conversations. Columns or keys a format does
not use are kept in `Example.fields`.

Hostile input is refused early and in bounded memory: the file is never held whole (lines, JSON array
items and CSV rows are read one at a time up to `DataLimits.max_line_bytes`, a longer one is skipped as
it streams; Parquet is read in batches of rows, row group by row group), JSON nesting is measured before
it is parsed, gzip output is capped in size and in expansion ratio, CSV columns and field sizes are
capped, and a file whose first bytes are not UTF-8 text gets one problem, not one per line.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import hashlib
import json
import random
import re
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Literal, Protocol

from shared import pii
from shared.file_validation import MAX_PROBLEMS_SHOWN, ROLES, chat_example_problem
from shared.near_duplicates import NearDuplicates

FORMATS: tuple[str, ...] = (
    "chat",
    "prompt_completion",
    "text",
    "alpaca",
    "sharegpt",
    "preference",
    "classification",
)
CONTAINERS: tuple[str, ...] = ("jsonl", "json", "csv", "parquet", "jsonl.gz", "json.gz", "csv.gz")
# What each format trains: the kind of the examples it converts into.
TASKS: dict[str, str] = {
    "chat": "chat",
    "prompt_completion": "chat",
    "alpaca": "chat",
    "sharegpt": "chat",
    "text": "text",
    "preference": "preference",
    "classification": "classification",
}
SHAREGPT_ROLES: dict[str, str] = {
    "human": "user",
    "gpt": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
}

_CHUNK = 1 << 16  # bytes read at a time
_HEAD = 1 << 13  # bytes looked at to tell the container and whether the file is text at all
_RATIO_CHECK_AFTER = 8 << 20  # decompressed bytes before the compression ratio is judged
_PARQUET_BATCH_ROWS = 256
_MAX_DUPLICATE_HASHES = 1 << 20  # examples remembered for the exact-duplicate count
_LENGTH_SAMPLE = 100_000  # example lengths kept (a uniform sample beyond) for the percentiles
_FIRST_SEEN = 5  # sources listed per kind of personal data


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


@dataclass
class Example:
    """One training example, whatever the format it came in."""

    kind: Literal["chat", "text", "preference", "classification"]
    source: str  # "line 3" / "item 3" / "row 3": where it is in the file
    messages: list[dict[str, Any]] | None = None  # chat; for preference: the prompt messages
    text: str | None = None  # text and classification
    chosen: list[dict[str, Any]] | None = None  # preference: the preferred assistant message(s)
    rejected: list[dict[str, Any]] | None = None
    label: str | None = None  # classification (always a string)
    tools: list[dict[str, Any]] | None = None  # chat and preference: OpenAI-style function tools
    fields: dict[str, Any] = field(default_factory=dict)  # other keys or columns, e.g. "group", "id"

    def to_record(self) -> dict[str, Any]:
        """The example as one line of Tunery's canonical JSONL (OpenAI's shapes where OpenAI has one)."""
        if self.kind == "chat":
            record: dict[str, Any] = {"messages": self.messages}
        elif self.kind == "preference":
            prompt: dict[str, Any] = {"messages": self.messages}
            if self.tools:
                prompt["tools"] = self.tools
            return {"input": prompt, "preferred_output": self.chosen, "non_preferred_output": self.rejected}
        elif self.kind == "classification":
            return {"text": self.text, "label": self.label}
        else:
            return {"text": self.text}
        if self.tools:
            record["tools"] = self.tools
        return record


@dataclass
class DatasetCheck:
    container: str | None  # jsonl, json, csv, parquet; jsonl.gz, json.gz, csv.gz
    format: str | None  # one of FORMATS
    task: str | None  # what it trains: chat, text, preference or classification
    n_examples: int
    problems: list[str]  # the first 20
    total_problems: int
    # exact_duplicates, empty_turns (whitespace-only message contents), characters {p50, p95, max} per
    # example, labels {label: count} for classification
    stats: dict[str, Any]
    pii: dict[str, Any]  # {"counts": {kind: n}, "first_seen": {kind: ["line 3", ...up to 5]}}

    @property
    def ok(self) -> bool:
        return self.total_problems == 0

    def summary(self) -> str:
        if self.ok:
            return f"{self.n_examples} {self.format} examples"
        shown = "; ".join(self.problems)
        more = self.total_problems - len(self.problems)
        tail = f" (and {more} more)" if more > 0 else ""
        noun = "problem" if self.total_problems == 1 else "problems"
        return f"{self.total_problems} {noun}: {shown}{tail}"


class DataFormatError(ValueError):
    """A dataset (or one of its records) cannot be read as it is; the message names where and why."""


class _UnknownContainer(DataFormatError):
    """Neither the name nor the first bytes say what the file is."""


# -- public entry points ----------------------------------------------------------------------------


def check_dataset(
    f: BinaryIO,
    *,
    filename: str,
    format: str | None = None,
    limits: DataLimits = DataLimits(),
    scan_pii: bool = True,
) -> DatasetCheck:
    """Validate a whole dataset in one streaming pass: its problems, statistics and personal data.

    `f` is read from its current position (seek to 0 first); only Parquet needs it seekable. `format`
    forces one of FORMATS instead of detecting it (ValueError for an unknown name).
    """
    reader = _Reader(f, filename=filename, format=format, limits=limits)
    problems: list[str] = []
    total = 0
    stats = _Stats(limits)
    personal = _PersonalData()
    fatal = False
    for event in reader.events():
        if isinstance(event, _Issue):
            total += 1
            if len(problems) < MAX_PROBLEMS_SHOWN:
                problems.append(event.text)
            fatal = fatal or event.fatal
            continue
        label_problem = stats.add(event)
        if label_problem is not None:
            total += 1
            if len(problems) < MAX_PROBLEMS_SHOWN:
                problems.append(label_problem)
        if scan_pii:
            personal.add(event)
    n_examples = stats.n_examples
    if not fatal and n_examples < limits.min_examples:
        total += 1
        if len(problems) < MAX_PROBLEMS_SHOWN:
            problems.append(
                f"the file has {n_examples} valid examples; at least {limits.min_examples} are required"
            )
    return DatasetCheck(
        container=reader.container,
        format=reader.format,
        task=TASKS.get(reader.format) if reader.format else None,
        n_examples=n_examples,
        problems=problems,
        total_problems=total,
        stats=stats.result(reader.format == "classification"),
        pii=personal.result(),
    )


def read_examples(
    f: BinaryIO,
    *,
    filename: str,
    format: str | None = None,
    limits: DataLimits = DataLimits(),
) -> Iterator[Example]:
    """The converted examples of a dataset, in file order; raises DataFormatError at the first bad record.

    A file that `check_dataset` passed never raises (the minimum number of examples is not re-checked).
    """
    reader = _Reader(f, filename=filename, format=format, limits=limits)  # checks `format` at once
    return _raising(reader.events())


def _raising(events: Iterator[Example | _Issue]) -> Iterator[Example]:
    for event in events:
        if isinstance(event, _Issue):
            raise DataFormatError(event.text)
        yield event


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


def detect_format(record: Mapping[str, Any]) -> str | None:
    """The format a record's keys say it is in, or None."""
    if "messages" in record:
        return "chat"
    if "input" in record and ("preferred_output" in record or "non_preferred_output" in record):
        return "preference"
    if "conversations" in record:
        return "preference" if "chosen" in record or "rejected" in record else "sharegpt"
    if "prompt" in record and ("chosen" in record or "rejected" in record):
        return "preference"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "text" in record:
        return "classification" if "label" in record else "text"
    return None


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


# -- formats: one record → one Example --------------------------------------------------------------


class _Bad(Exception):
    """A record's problem, in the words of `chat_example_problem`: `field: reason`."""


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return {dict: "an object", list: "an array", str: "a string", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _string(
    record: Mapping[str, Any], key: str, *, required: bool = True, nonblank: bool = False
) -> str | None:
    value = record.get(key)
    if value is None:
        if required:
            raise _Bad(f'missing "{key}"')
        return None
    if not isinstance(value, str):
        raise _Bad(f"{key}: must be a string, got {_type_name(value)}")
    if nonblank and not value.strip():
        raise _Bad(f"{key}: empty")
    return value


def _rest(record: Mapping[str, Any], *used: str) -> dict[str, Any]:
    return {key: value for key, value in record.items() if key not in used}


def _tools(value: Any, key: str = "tools") -> list[dict[str, Any]] | None:
    """OpenAI-style tools from a list (or a JSON string, as LLaMA-Factory stores them) of function schemas."""
    if value is None:
        return None
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise _Bad(f"{key}: not valid JSON ({_json_error(exc)})") from None
    if not isinstance(value, list):
        raise _Bad(f"{key}: must be a list of tools, got {_type_name(value)}")
    tools = []
    for i, tool in enumerate(value):
        if not isinstance(tool, dict):
            raise _Bad(f"{key}[{i}]: expected an object, got {_type_name(tool)}")
        if "type" in tool:
            tools.append(tool)
        elif "name" in tool:
            tools.append({"type": "function", "function": tool})  # a bare function schema
        else:
            raise _Bad(
                f'{key}[{i}]: expected a tool ({{"type": "function", "function": {{...}}}}) or a function schema with a "name"'
            )
    return tools or None


# The source of each converted message, for problems: (path, how its fields are named there) where the
# naming is None for a message made from a plain string field.
_Paths = list[tuple[str, dict[str, str] | None]]
_SAME: dict[str, str] = {}
_SHAREGPT_FIELDS = {".role": ".from", ".content": ".value"}
_MESSAGE_REF = re.compile(r"messages\[(\d+)\](\.\w+)?")


def _check_chat(messages: list[dict[str, Any]], paths: _Paths) -> None:
    problem = chat_example_problem({"messages": messages})
    if problem is None:
        return
    match = _MESSAGE_REF.match(problem)
    if match is not None:
        path, naming = paths[int(match[1])]
        suffix = "" if naming is None else naming.get(match[2] or "", match[2] or "")
        problem = path + suffix + problem[match.end() :]
    raise _Bad(problem)


def _chat(record: Mapping[str, Any], source: str) -> Example:
    problem = chat_example_problem(record)
    if problem:
        raise _Bad(problem)
    return Example(
        kind="chat",
        source=source,
        messages=[dict(message) for message in record["messages"]],
        tools=_tools(record.get("tools")),
        fields=_rest(record, "messages", "tools"),
    )


def _prompt_completion(record: Mapping[str, Any], source: str) -> Example:
    prompt = _string(record, "prompt")
    completion = _string(record, "completion")
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    return Example(
        kind="chat", source=source, messages=messages, fields=_rest(record, "prompt", "completion")
    )


def _text(record: Mapping[str, Any], source: str) -> Example:
    text = _string(record, "text", nonblank=True)
    return Example(kind="text", source=source, text=text, fields=_rest(record, "text"))


def _classification(record: Mapping[str, Any], source: str) -> Example:
    text = _string(record, "text", nonblank=True)
    label = record.get("label")
    if label is None:
        raise _Bad('missing "label"')
    if isinstance(label, bool):
        label = "true" if label else "false"
    elif isinstance(label, float) and label.is_integer():
        label = str(int(label))
    elif isinstance(label, int):
        label = str(label)
    elif not isinstance(label, str):
        raise _Bad(f"label: must be a string or an integer, got {_type_name(label)}")
    if not label.strip():
        raise _Bad("label: empty")
    return Example(
        kind="classification", source=source, text=text, label=label, fields=_rest(record, "text", "label")
    )


def _alpaca(record: Mapping[str, Any], source: str) -> Example:
    instruction = _string(record, "instruction", nonblank=True)
    extra = _string(record, "input", required=False)
    output = _string(record, "output")
    system = _string(record, "system", required=False)
    messages: list[dict[str, Any]] = []
    if system and system.strip():
        messages.append({"role": "system", "content": system})
    history = record.get("history")
    if history is not None:
        if not isinstance(history, list):
            raise _Bad(f"history: must be a list of [instruction, response] pairs, got {_type_name(history)}")
        for i, pair in enumerate(history):
            if not (
                isinstance(pair, list) and len(pair) == 2 and all(isinstance(part, str) for part in pair)
            ):
                raise _Bad(f"history[{i}]: must be a pair of strings [instruction, response]")
            messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    prompt = instruction + "\n\n" + extra if extra and extra.strip() else instruction
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return Example(
        kind="chat",
        source=source,
        messages=messages,
        fields=_rest(record, "instruction", "input", "output", "system", "history"),
    )


def _sharegpt_turns(turns: Any, key: str) -> tuple[list[dict[str, Any]], _Paths]:
    if not isinstance(turns, list) or not turns:
        raise _Bad(f'"{key}" must be a non-empty list of {{"from", "value"}} objects')
    messages: list[dict[str, Any]] = []
    paths: _Paths = []
    for i, turn in enumerate(turns):
        messages.append(_sharegpt_turn(turn, f"{key}[{i}]"))
        paths.append((f"{key}[{i}]", _SHAREGPT_FIELDS))
    return messages, paths


def _sharegpt_turn(turn: Any, where: str) -> dict[str, Any]:
    if not isinstance(turn, dict):
        raise _Bad(f"{where}: expected an object, got {_type_name(turn)}")
    if "from" not in turn:
        raise _Bad(f'{where}: missing "from"')
    speaker = turn["from"]
    if speaker not in SHAREGPT_ROLES:
        raise _Bad(f"{where}.from: {json.dumps(speaker)} is not one of {', '.join(SHAREGPT_ROLES)}")
    value = turn.get("value")
    if not isinstance(value, str):
        raise _Bad(f"{where}.value: missing or not a string")
    message: dict[str, Any] = {"role": SHAREGPT_ROLES[speaker], "content": value}
    if "weight" in turn:
        message["weight"] = turn["weight"]
    return message


def _sharegpt_prefix(record: Mapping[str, Any]) -> tuple[list[dict[str, Any]], _Paths]:
    system = _string(record, "system", required=False)
    if system and system.strip():
        return [{"role": "system", "content": system}], [("system", None)]
    return [], []


def _sharegpt(record: Mapping[str, Any], source: str) -> Example:
    if "conversations" not in record:
        raise _Bad('missing "conversations" (a list of {"from", "value"} objects)')
    messages, paths = _sharegpt_prefix(record)
    turns, turn_paths = _sharegpt_turns(record["conversations"], "conversations")
    messages += turns
    paths += turn_paths
    _check_chat(messages, paths)
    return Example(
        kind="chat",
        source=source,
        messages=messages,
        tools=_tools(record.get("tools")),
        fields=_rest(record, "conversations", "system", "tools"),
    )


def _preference(record: Mapping[str, Any], source: str) -> Example:
    if "input" in record or "preferred_output" in record or "non_preferred_output" in record:
        return _preference_openai(record, source)
    if "conversations" in record:
        return _preference_sharegpt(record, source)
    return _preference_prompt(record, source)


def _check_pair(
    prompt: list[dict[str, Any]], paths: _Paths, replies: list[tuple[list[dict[str, Any]], _Paths]]
) -> None:
    for reply, reply_paths in replies:
        for message, (path, naming) in zip(reply, reply_paths, strict=True):
            if isinstance(message, dict) and message.get("role") not in (None, "assistant"):
                role = ".from" if naming is _SHAREGPT_FIELDS else ".role"
                raise _Bad(
                    f"{path}{role if naming is not None else ''}: the reply must be an assistant message"
                )
        _check_chat(prompt + reply, paths + reply_paths)


def _preference_openai(record: Mapping[str, Any], source: str) -> Example:
    prompt = record.get("input")
    if prompt is None:
        raise _Bad('missing "input" (an object with the prompt "messages")')
    if not isinstance(prompt, dict):
        raise _Bad(f'input: must be an object with "messages", got {_type_name(prompt)}')
    messages = prompt.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _Bad('input.messages: must be a non-empty list of {"role", "content"} objects')
    replies = []
    for key, what in (("preferred_output", "preferred"), ("non_preferred_output", "rejected")):
        reply = record.get(key)
        if reply is None:
            raise _Bad(f'missing "{key}" (a list holding the {what} assistant message)')
        if not isinstance(reply, list) or not reply:
            raise _Bad(f'"{key}" must be a non-empty list of assistant messages')
        replies.append((reply, [(f"{key}[{i}]", _SAME) for i in range(len(reply))]))
    paths: _Paths = [(f"input.messages[{i}]", _SAME) for i in range(len(messages))]
    _check_pair(messages, paths, replies)
    fields = _rest(record, "input", "preferred_output", "non_preferred_output")
    fields.update(_rest(prompt, "messages", "tools"))
    return Example(
        kind="preference",
        source=source,
        messages=[dict(m) for m in messages],
        chosen=[dict(m) for m in replies[0][0]],
        rejected=[dict(m) for m in replies[1][0]],
        tools=_tools(prompt.get("tools"), "input.tools"),
        fields=fields,
    )


def _reply(record: Mapping[str, Any], key: str, sharegpt: bool) -> tuple[list[dict[str, Any]], _Paths]:
    """A chosen or rejected reply: a string, a list of messages, or ({from, value} objects in sharegpt)."""
    value = record.get(key)
    if value is None:
        raise _Bad(f'missing "{key}" (the {key} reply)')
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}], [(key, None)]
    if sharegpt and isinstance(value, dict):
        return [_sharegpt_turn(value, key)], [(key, _SHAREGPT_FIELDS)]
    if isinstance(value, list) and value:
        if sharegpt:
            return _sharegpt_turns(value, key)
        return [m if not isinstance(m, dict) else dict(m) for m in value], [
            (f"{key}[{i}]", _SAME) for i in range(len(value))
        ]
    shape = (
        'a string or a {"from", "value"} object' if sharegpt else "a string or a non-empty list of messages"
    )
    raise _Bad(f"{key}: must be {shape}, got {_type_name(value)}")


def _preference_sharegpt(record: Mapping[str, Any], source: str) -> Example:
    messages, paths = _sharegpt_prefix(record)
    turns, turn_paths = _sharegpt_turns(record["conversations"], "conversations")
    messages += turns
    paths += turn_paths
    chosen = _reply(record, "chosen", sharegpt=True)
    rejected = _reply(record, "rejected", sharegpt=True)
    _check_pair(messages, paths, [chosen, rejected])
    return Example(
        kind="preference",
        source=source,
        messages=messages,
        chosen=chosen[0],
        rejected=rejected[0],
        tools=_tools(record.get("tools")),
        fields=_rest(record, "conversations", "system", "tools", "chosen", "rejected"),
    )


def _preference_prompt(record: Mapping[str, Any], source: str) -> Example:
    prompt = record.get("prompt")
    if prompt is None:
        raise _Bad('missing "prompt"')
    messages, paths = _sharegpt_prefix(record)
    if isinstance(prompt, str):
        messages.append({"role": "user", "content": prompt})
        paths.append(("prompt", None))
    elif isinstance(prompt, list) and prompt:
        messages += [m if not isinstance(m, dict) else dict(m) for m in prompt]
        paths += [(f"prompt[{i}]", _SAME) for i in range(len(prompt))]
    else:
        raise _Bad(f"prompt: must be a string or a non-empty list of messages, got {_type_name(prompt)}")
    chosen = _reply(record, "chosen", sharegpt=False)
    rejected = _reply(record, "rejected", sharegpt=False)
    _check_pair(messages, paths, [chosen, rejected])
    return Example(
        kind="preference",
        source=source,
        messages=messages,
        chosen=chosen[0],
        rejected=rejected[0],
        tools=_tools(record.get("tools")),
        fields=_rest(record, "prompt", "system", "tools", "chosen", "rejected"),
    )


_CONVERTERS = {
    "chat": _chat,
    "prompt_completion": _prompt_completion,
    "text": _text,
    "alpaca": _alpaca,
    "sharegpt": _sharegpt,
    "preference": _preference,
    "classification": _classification,
}
# A record detected as the second format may be an incomplete one of the first: let the file's format
# name the missing key ('missing "label"') rather than call it another format.
_INCOMPLETE_OF = {("classification", "text"), ("preference", "sharegpt")}
_KEYS_HINT = (
    '"messages", "prompt" + "completion", "text" (+ "label"), "instruction" + "output", "conversations", '
    '"prompt" + "chosen" + "rejected", or "input" + "preferred_output" + "non_preferred_output"'
)
# Columns that hold JSON in a CSV file (the others are strings).
_CSV_JSON_COLUMNS = frozenset(
    {"messages", "conversations", "tools", "preferred_output", "non_preferred_output", "history"}
)


def _required_columns(format: str, columns: list[str]) -> tuple[str, ...]:
    if format == "preference":
        if "input" in columns or "preferred_output" in columns:
            return ("input", "preferred_output", "non_preferred_output")
        if "conversations" in columns:
            return ("conversations", "chosen", "rejected")
        return ("prompt", "chosen", "rejected")
    return {
        "chat": ("messages",),
        "prompt_completion": ("prompt", "completion"),
        "text": ("text",),
        "classification": ("text", "label"),
        "alpaca": ("instruction", "output"),
        "sharegpt": ("conversations",),
    }[format]


class _Reader:
    """One pass over a dataset: yields its Examples and its problems (`_Issue`), in file order."""

    def __init__(self, f: BinaryIO, *, filename: str, format: str | None, limits: DataLimits) -> None:
        if format is not None and format not in FORMATS:
            raise ValueError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
        self._f = f
        self._filename = filename
        self._limits = limits
        self._forced = format is not None
        self.format = format
        self.container: str | None = None
        self._detected_from: str | None = None
        self._json_cells: frozenset[str] = frozenset()
        self._tabular = False  # CSV and Parquet: the columns fix the format for every row

    def events(self) -> Iterator[Example | _Issue]:
        for item in self._records():
            if isinstance(item, _Issue):
                yield item
                if item.fatal:
                    return
            elif isinstance(item, _Columns):
                problem = self._columns(item)
                if problem is not None:
                    yield _Issue(problem, fatal=True)
                    return
            else:
                yield self._convert(item)

    def _records(self) -> Iterator[_Record | _Issue | _Columns]:
        limits = self._limits
        raw_head = _read_up_to(self._f, _HEAD)
        try:
            self.container = detect_container(self._filename, raw_head)
        except _UnknownContainer as exc:  # binary data, likely: say so rather than "cannot tell"
            text_problem = None
            if raw_head.startswith(b"\x1f\x8b"):
                with contextlib.suppress(DataFormatError):
                    inner = _gunzip_head(raw_head)
                    text_problem = _text_problem(inner, len(inner) < _HEAD)
            elif not raw_head.startswith(b"PAR1"):
                text_problem = _text_problem(raw_head, len(raw_head) < _HEAD)
            yield _Issue(text_problem or str(exc), fatal=True)
            return
        except DataFormatError as exc:
            yield _Issue(str(exc), fatal=True)
            return
        if self.container == "parquet":
            yield from _parquet_records(self._f, limits)
            return
        stream: _Readable = _Chain(raw_head, self._f)
        if self.container.endswith(".gz"):
            stream = _BoundedGunzip(stream, limits)
        try:
            head = _read_up_to(stream, _HEAD)
        except _Fatal as exc:
            yield _Issue(str(exc), fatal=True)
            return
        problem = _text_problem(head, len(head) < _HEAD)
        if problem is not None:
            yield _Issue(problem, fatal=True)
            return
        if head.startswith(codecs.BOM_UTF8):
            head = head[3:]
        stream = _Chain(head, stream)
        base = self.container.removesuffix(".gz")
        try:
            if base == "jsonl":
                yield from _jsonl_records(stream, limits)
            elif base == "json":
                yield from _JsonArray(stream, limits).records()
            else:
                yield from _csv_records(stream, limits)
        except _Fatal as exc:  # from the decompressor, under any reader
            yield _Issue(str(exc), fatal=True)

    def _columns(self, columns: _Columns) -> str | None:
        """Tabular files: the format from the column names, and the columns it needs."""
        names = columns.names
        self._tabular = True
        if self.format is None:
            self.format = detect_format(dict.fromkeys(names))
            if self.format is None:
                return f"no known format has the columns {_list(names)}; expected columns {_KEYS_HINT}"
            self._detected_from = columns.what
        for required in _required_columns(self.format, names):
            if required not in names:
                return f'{columns.what} has no "{required}" column (the columns are: {_list(names)})'
        if columns.what == "the header":
            cells = set(_CSV_JSON_COLUMNS)
            if "preferred_output" in names or "non_preferred_output" in names:
                cells.add("input")
            if "conversations" in names:
                cells |= {"chosen", "rejected"}
            self._json_cells = frozenset(cells & set(names))
        return None

    def _convert(self, record: _Record) -> Example | _Issue:
        source, value = record.source, record.value
        if not isinstance(value, dict):
            return _issue(source, f"expected a JSON object, got {_type_name(value)}")
        if self._json_cells:
            try:
                value = self._parse_cells(value)
            except _Bad as exc:
                return _issue(source, str(exc))
        if self.format is None:
            self.format = detect_format(value)
            if self.format is None:
                keys = _list(list(value)) if value else "none"
                return _issue(source, f"no known format has the keys {keys}; expected {_KEYS_HINT}")
            self._detected_from = source
        elif not (self._forced or self._tabular):
            kind = detect_format(value)
            if kind is not None and kind != self.format and (self.format, kind) not in _INCOMPLETE_OF:
                return _issue(
                    source,
                    f"a {kind} example, but the file holds {self.format} examples (detected from "
                    f"{self._detected_from}); a file must hold a single format",
                )
        try:
            return _CONVERTERS[self.format](value, source)
        except _Bad as exc:
            return _issue(source, str(exc))

    def _parse_cells(self, row: dict[str, Any]) -> dict[str, Any]:
        row = dict(row)
        for name in self._json_cells:
            cell = row.get(name)
            if isinstance(cell, str):
                if not cell.strip():
                    row[name] = None
                    continue
                depth = self._limits.max_depth
                try:
                    row[name] = json.loads(cell)
                except RecursionError:
                    raise _Bad(f"{name}: JSON is nested too deeply (more than {depth} levels)") from None
                except ValueError as exc:
                    raise _Bad(f"{name}: not valid JSON ({_json_error(exc)})") from None
                if _deep_candidate(row[name], cell.count("[") + cell.count("{"), depth):
                    raise _Bad(f"{name}: JSON is nested too deeply (more than {depth} levels)")
        return row


def _list(names: list[str], at_most: int = 20) -> str:
    shown = ", ".join(names[:at_most])
    return shown + (f" and {len(names) - at_most} more" if len(names) > at_most else "")


# -- statistics ------------------------------------------------------------------------------------


def _all_messages(example: Example) -> Iterator[dict[str, Any]]:
    for messages in (example.messages, example.chosen, example.rejected):
        for message in messages or ():
            if isinstance(message, dict):
                yield message


def _texts(example: Example) -> Iterator[str]:
    """The text an example trains on, for the personal-data scan."""
    if example.text is not None:
        yield example.text
    for message in _all_messages(example):
        content = message.get("content")
        if isinstance(content, str):
            yield content
        for call in message.get("tool_calls") or ():
            if isinstance(call, dict):
                yield json.dumps(call, ensure_ascii=False)


class _PersonalData:
    """Counts of personal data by kind, scanned in batches of examples (one regex pass per batch)."""

    _BATCH_CHARACTERS = 1 << 18

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._first_seen: dict[str, list[str]] = {}
        self._texts: list[str] = []
        self._sources: list[str] = []
        self._size = 0

    def add(self, example: Example) -> None:
        text = "\n\n".join(_texts(example))
        self._texts.append(text)
        self._sources.append(example.source)
        self._size += len(text)
        if self._size >= self._BATCH_CHARACTERS:
            self._scan()

    def _scan(self) -> None:
        for source, found in zip(self._sources, pii.scan_each(self._texts), strict=True):
            for kind, n in found.items():
                self._counts[kind] = self._counts.get(kind, 0) + n
                seen = self._first_seen.setdefault(kind, [])
                if len(seen) < _FIRST_SEEN:
                    seen.append(source)
        self._texts.clear()
        self._sources.clear()
        self._size = 0

    def result(self) -> dict[str, Any]:
        self._scan()
        return {"counts": self._counts, "first_seen": self._first_seen}


class _Stats:
    def __init__(self, limits: DataLimits) -> None:
        self._limits = limits
        self.n_examples = 0
        self._hashes: set[bytes] = set()
        self._duplicates = 0
        self._empty_turns = 0
        self._lengths: list[int] = []
        self._longest = 0
        self._random = random.Random(0)
        self._labels: dict[str, int] = {}
        self._labels_overflow = False
        self._near = NearDuplicates()

    def add(self, example: Example) -> str | None:
        """Count an example in; a problem when it brings one label too many."""
        self.n_examples += 1
        # repr is exact for equal examples (same keys in the same order) and far cheaper than sorted JSON
        key = repr(
            (
                example.kind,
                example.messages,
                example.text,
                example.chosen,
                example.rejected,
                example.label,
                example.tools,
            )
        )
        digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        if digest in self._hashes:
            self._duplicates += 1
        else:
            if len(self._hashes) < _MAX_DUPLICATE_HASHES:
                self._hashes.add(digest)
            self._near.add("\n".join(_texts(example)), example.source)
        characters = len(example.text or "")
        for message in _all_messages(example):
            content = message.get("content")
            if isinstance(content, str):
                characters += len(content)
                if not content.strip():
                    self._empty_turns += 1
        self._longest = max(self._longest, characters)
        if len(self._lengths) < _LENGTH_SAMPLE:
            self._lengths.append(characters)
        else:
            slot = self._random.randrange(self.n_examples)
            if slot < _LENGTH_SAMPLE:
                self._lengths[slot] = characters
        if example.label is not None:
            if example.label in self._labels:
                self._labels[example.label] += 1
            elif len(self._labels) < self._limits.max_labels:
                self._labels[example.label] = 1
            elif not self._labels_overflow:
                self._labels_overflow = True
                return (
                    f"{example.source}: label: more than {self._limits.max_labels} distinct labels; "
                    "classification needs a fixed set of classes"
                )
        return None

    def result(self, classification: bool) -> dict[str, Any]:
        lengths = sorted(self._lengths)

        def percentile(p: float) -> int:
            return lengths[min(len(lengths) - 1, int(p * len(lengths)))] if lengths else 0

        stats: dict[str, Any] = {
            "exact_duplicates": self._duplicates,
            **self._near.result(),
            "empty_turns": self._empty_turns,
            "characters": {"p50": percentile(0.50), "p95": percentile(0.95), "max": self._longest},
        }
        if classification:
            stats["labels"] = dict(sorted(self._labels.items(), key=lambda item: (-item[1], item[0])))
        return stats


__all__ = [
    "CONTAINERS",
    "FORMATS",
    "ROLES",
    "SHAREGPT_ROLES",
    "TASKS",
    "DataFormatError",
    "DataLimits",
    "DatasetCheck",
    "Example",
    "check_dataset",
    "detect_container",
    "detect_format",
    "read_examples",
]
