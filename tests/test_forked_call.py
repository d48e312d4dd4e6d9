"""shared.platform.forked.ForkedCall: a function run in a forked child while the caller works on, whose
value or exception comes back to the caller, and which never outlives the caller's interest in it: left
behind when the block is left, or when the caller itself is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from shared.platform.forked import ForkedCall, ForkedCallDied
from tests.helpers import wait_for

REPO = Path(__file__).resolve().parent.parent


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (killed, not yet reaped by its dead parent's reaper) is gone for our purpose.
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"


def test_the_child_computes_in_its_own_copy_of_memory_and_returns_its_value() -> None:
    state = {"n": 1}

    def work() -> tuple[int, int]:
        state["n"] += 10  # the child's copy
        return os.getpid(), state["n"]

    with ForkedCall(work) as call:
        state["n"] += 100  # the caller's copy, meanwhile
        pid, seen = call.result()

    assert pid != os.getpid()
    assert (seen, state["n"]) == (11, 101)


def test_an_exception_in_the_child_is_raised_again_by_result() -> None:
    def work() -> None:
        raise ValueError("no good")

    with ForkedCall(work) as call, pytest.raises(ValueError, match="no good"):
        call.result()


def test_a_child_killed_before_it_answers_is_reported_with_its_exit_code() -> None:
    def work() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    with ForkedCall(work) as call, pytest.raises(ForkedCallDied, match="exit code -9"):
        call.result()


def test_leaving_the_block_kills_a_child_still_running() -> None:
    with ForkedCall(lambda: time.sleep(60)) as call:
        pid = call._process.pid
        assert pid is not None and _alive(pid)
    assert not _alive(pid)


def test_the_child_dies_with_a_caller_killed_by_sigkill(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    caller = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import os, time
            from pathlib import Path
            from shared.platform.forked import ForkedCall

            def work():
                Path({str(pid_file)!r}).write_text(str(os.getpid()))
                time.sleep(60)

            call = ForkedCall(work)
            call.result()
        """)],
        cwd=REPO,
    )  # fmt: skip
    try:
        wait_for(lambda: pid_file.exists() and pid_file.read_text(), 30, "the forked child", caller)
        child = int(pid_file.read_text())
        caller.kill()
        caller.wait(10)
        wait_for(lambda: not _alive(child), 10, "the orphaned child's death")
    finally:
        caller.kill()
