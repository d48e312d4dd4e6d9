"""Upload validation in worker processes: they check files as the API would, and none outlives the API."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from shared.data.formats import DataLimits
from shared.data.validation_process import check_file
from tests.api_fixtures import chat_lines

ROOT = Path(__file__).resolve().parent.parent

# An API-like parent: validates one file through the pool, prints its validation processes, then waits.
PARENT = """
import sys, time
from pathlib import Path
from shared.data import validation_process
from shared.data.formats import DataLimits
check = validation_process.check_file(
    Path(sys.argv[1]), filename="train.jsonl", format=None, limits=DataLimits(), seconds=60
)
assert check.ok, check.problems
print(" ".join(str(pid) for pid in validation_process._pool._processes), flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie has exited; only its parent's wait is missing
        return stat.read().split(") ")[-1][0] != "Z"


def test_a_file_is_checked_in_a_validation_process(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(chat_lines(20))

    check = check_file(path, filename="train.jsonl", format=None, limits=DataLimits(), seconds=60)

    assert check.ok and check.n_examples == 20 and check.format == "chat"


def test_validation_processes_exit_when_the_api_process_is_killed(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(chat_lines(20))
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        workers = [int(pid) for pid in parent.stdout.readline().split()]
        assert workers and all(_alive(pid) for pid in workers)

        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)

        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in workers)
    finally:
        parent.kill()
        parent.wait(timeout=10)


def test_a_heartbeat_is_called_while_a_validation_runs(tmp_path: Path):
    # What keeps a validation's claim on its file alive while it takes minutes (services/api/file_ingest.py).
    path = tmp_path / "train.jsonl"
    path.write_bytes(chat_lines(100_000))  # about 10 MB: a second or more of validation
    beats: list[float] = []
    check = check_file(
        path, filename="train.jsonl", format=None, limits=DataLimits(), seconds=60,
        heartbeat=lambda: beats.append(time.monotonic()), heartbeat_seconds=0.05,
    )  # fmt: skip
    assert (check.ok, check.n_examples) == (True, 100_000)
    assert len(beats) >= 2
