"""A whole dataset checked in one streaming pass: its problems, statistics and personal data."""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from shared.data import pii
from shared.data.file_validation import MAX_PROBLEMS_SHOWN
from shared.data.formats.containers import DataLimits, _Issue
from shared.data.formats.converters import TASKS, Example, _Reader
from shared.data.near_duplicates import NearDuplicates

_MAX_DUPLICATE_HASHES = 1 << 20  # examples remembered for the exact-duplicate count
_LENGTH_SAMPLE = 100_000  # example lengths kept (a uniform sample beyond) for the percentiles
_FIRST_SEEN = 5  # sources listed per kind of personal data


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

    def problem_list(self) -> list[dict[str, Any]]:
        """The problems shown, each as {place, line, field, reason} (problem_parts)."""
        return [problem_parts(text) for text in self.problems]

    def summary(self) -> str:
        if self.ok:
            return f"{self.n_examples} {self.format} examples"
        shown = "; ".join(self.problems)
        more = self.total_problems - len(self.problems)
        tail = f" (and {more} more)" if more > 0 else ""
        noun = "problem" if self.total_problems == 1 else "problems"
        return f"{self.total_problems} {noun}: {shown}{tail}"


# Every problem reads "<place> <n>: <field>: <reason>" (place and field where there is one), as the
# containers and converters word them: `line 11: messages[2].role: "assitant" is not one of ...`.
_PLACE = re.compile(r"^(line|item|row) (\d+): ")
_FIELD = re.compile(r"^([A-Za-z_]\w*(?:\[\d+\])*(?:\.[A-Za-z_]\w*(?:\[\d+\])*)*): ")
_MISSING = re.compile(r'^missing "([^"]+)"')


def problem_parts(text: str) -> dict[str, Any]:
    """A problem as a table row: where (place "line", "item" or "row" and its number, both None for the whole
    file), the field it is about (None when it names none) and the reason, so clients need not parse it."""
    place = _PLACE.match(text)
    reason = text[place.end() :] if place else text
    field = _FIELD.match(reason)
    name = None
    if field:
        name, reason = field.group(1), reason[field.end() :]
    elif missing := _MISSING.match(reason):
        name = missing.group(1)
    return {
        "place": place.group(1) if place else None,
        "line": int(place.group(2)) if place else None,
        "field": name,
        "reason": reason,
    }


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
            "characters": {
                "p50": percentile(0.50),
                "p95": percentile(0.95),
                "max": self._longest,
                "histogram": _histogram(lengths),
            },
        }
        if classification:
            stats["labels"] = dict(sorted(self._labels.items(), key=lambda item: (-item[1], item[0])))
        return stats


_HISTOGRAM_BINS = 10


def _histogram(lengths: list[int]) -> dict[str, list[int]]:
    """Example lengths (sorted; a uniform sample beyond 100,000 examples) in about ten bins of a round width
    (1, 2 or 5 × a power of ten): `counts[i]` examples have a length in [edges[i], edges[i + 1])."""
    if not lengths:
        return {"edges": [], "counts": []}
    low, high = lengths[0], lengths[-1]
    raw = max(1, math.ceil((high - low + 1) / _HISTOGRAM_BINS))
    power = 10 ** (len(str(raw)) - 1)
    width = next(step * power for step in (1, 2, 5, 10) if step * power >= raw)
    start = low // width * width
    counts = [0] * ((high - start) // width + 1)
    for length in lengths:
        counts[(length - start) // width] += 1
    return {"edges": [start + i * width for i in range(len(counts) + 1)], "counts": counts}
