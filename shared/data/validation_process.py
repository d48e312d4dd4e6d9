"""Validating a dataset file in worker processes, within a time budget.

Validation is pure-Python CPU work (JSON of every line, statistics, personal data). In a thread of the API
process it holds the GIL, and the event loop that answers every other client got about half of it: a
50 MB upload cut other clients' throughput to about half (bench/upload_concurrency.py). In a process of
its own it takes a core of its own, and the loop keeps its interpreter to itself.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, BinaryIO

from shared.data.formats import DataLimits, DatasetCheck, check_dataset
from shared.platform.cpus import usable_cpus

# Validation is CPU-bound: more processes than cores would only share them; a few uploads at once are
# validated side by side, later ones wait their turn.
MAX_PROCESSES = min(4, usable_cpus())
# Below the API's scheduling priority: where cores are short, the answers to other clients come first and
# validation takes the time left over.
NICENESS = 10

_pool: ProcessPoolExecutor | None = None
_pool_lock = threading.Lock()


class ValidationTimeout(Exception):
    """Validation ran past its time budget."""


class Budgeted:
    """`source`, read within a budget of CPU seconds: validation reads it piece by piece, so a read past the
    deadline stops it with ValidationTimeout, whatever the content makes the validator do. CPU time, not
    wall time: a validation process (low priority, alone in its process) that waits for a busy machine's
    cores has not spent its budget."""

    def __init__(self, source: BinaryIO, seconds: float) -> None:
        self._source = source
        self._deadline = time.process_time() + seconds

    def _check(self) -> None:
        if time.process_time() >= self._deadline:
            raise ValidationTimeout

    def read(self, size: int = -1) -> bytes:
        self._check()
        return self._source.read(size)

    def read1(self, size: int = -1) -> bytes:
        self._check()
        return self._source.read1(size)  # type: ignore[attr-defined]

    def readinto(self, buffer: Any) -> int:
        self._check()
        return self._source.readinto(buffer)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)


def _start_worker() -> None:
    """In each validation process: a lower priority, and an exit as soon as the API process is gone (killed
    with SIGKILL, it cannot stop its pool; an orphan would validate on, taking a core, for minutes)."""
    os.nice(NICENESS)
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _check_file(
    path: Path, filename: str, format: str | None, limits: DataLimits, seconds: float
) -> DatasetCheck | None:
    """In a worker process: the check of the file at `path`, or None when it ran out of time."""
    with open(path, "rb") as source:
        try:
            return check_dataset(Budgeted(source, seconds), filename=filename, format=format, limits=limits)
        except ValidationTimeout:
            return None


def _executor() -> ProcessPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            # spawn: forking the API process would copy its threads' locks mid-use.
            _pool = ProcessPoolExecutor(
                MAX_PROCESSES, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker
            )
        return _pool


def check_file(
    path: Path,
    *,
    filename: str,
    format: str | None,
    limits: DataLimits,
    seconds: float,
    heartbeat: Callable[[], None] | None = None,
    heartbeat_seconds: float = 5.0,
) -> DatasetCheck:
    """The check of the file at `path` (shared.data.formats.check_dataset), made in a worker process; blocks
    the calling thread (not its interpreter) until done. ValidationTimeout past `seconds` of reading.
    `heartbeat` is called every `heartbeat_seconds` while it waits: a validation that takes minutes can
    keep its claim on the file alive."""
    global _pool
    pool = _executor()
    try:
        future = pool.submit(_check_file, path, filename, format, limits, seconds)
        while heartbeat is not None and not wait([future], timeout=heartbeat_seconds).done:
            heartbeat()
        check = future.result()
    except BrokenProcessPool:
        # A worker died (killed for memory, say): later uploads get a fresh pool.
        with _pool_lock:
            if _pool is pool:
                _pool = None
        pool.shutdown(wait=False)
        raise
    if check is None:
        raise ValidationTimeout
    return check
