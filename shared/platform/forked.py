"""A function run in a forked child process while the caller goes on with other work.

For CPU work that holds one thread (a small model's forward passes are mostly Python), a second process
on a second CPU halves the wall time, where a second thread would only take turns on the GIL. The child
is a fork: it starts with the caller's memory (a loaded model, no pickling, no imports), and what it
changes stays its own. It dies with its parent (Linux's parent-death signal), so a killed work horse
leaves no orphan computing for nobody.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Generic, TypeVar

T = TypeVar("T")

_PR_SET_PDEATHSIG = 1


class ForkedCallDied(RuntimeError):
    """The child ended without a result (killed, or out of memory)."""


class ForkedCall(Generic[T]):
    """`fn()` in a forked child from construction on; `result()` waits for its value or re-raises its
    exception. Leaving the `with` block kills a child still running (the caller failed or moved on)."""

    def __init__(self, fn: Callable[[], T]) -> None:
        context = multiprocessing.get_context("fork")
        self._receiver, sender = context.Pipe(duplex=False)
        self._process = context.Process(target=_child, args=(fn, sender, os.getpid()), daemon=True)
        self._process.start()
        sender.close()

    def result(self) -> T:
        try:
            outcome, value = self._receiver.recv()
        except EOFError:
            self._process.join()
            raise ForkedCallDied(
                f"the forked process ended without a result (exit code {self._process.exitcode})"
            ) from None
        self._process.join()
        if outcome == "error":
            raise value
        return value

    def stop(self) -> None:
        if self._process.is_alive():
            self._process.kill()
        self._process.join()
        self._receiver.close()

    def __enter__(self) -> ForkedCall[T]:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _child(fn: Callable[[], object], sender: Connection, parent: int) -> None:
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the signal was asked for
            os._exit(1)
    try:
        message: tuple[str, object] = ("ok", fn())
    except BaseException as exc:  # every failure goes back to the caller, which re-raises it
        message = ("error", exc)
    try:
        sender.send(message)
    except Exception as exc:  # an exception or a value that does not pickle
        sender.send(
            (
                "error",
                ForkedCallDied(f"the forked call's outcome could not be sent back: {exc!r}: {message[1]!r}"),
            )
        )
