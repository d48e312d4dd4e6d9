"""Stopping an evaluation within a second once its job has moved on (cancelled, or failed by the janitor).

An evaluation is forward passes of two models (scoring batches, generating tokens) in loops that live in
the shared metric modules. Rather than thread a check through each of those loops, the watch hooks the
models' input embeddings, which every forward pass of every architecture goes through, and reads the
job's state from there at most every CHECK_INTERVAL_SECONDS: a check costs a Redis read, a forward pass
of a tiny model a millisecond.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from shared.platform.job_states import JobState
from shared.platform.job_store import JobStore

if TYPE_CHECKING:
    import torch

CHECK_INTERVAL_SECONDS = 0.5


class EvaluationCancelled(Exception):
    """The job is no longer evaluating this attempt: the evaluation must stop and publish nothing."""


class CancelWatch:
    def __init__(self, jobs: JobStore, job_id: str, attempt: int, interval: float = CHECK_INTERVAL_SECONDS):
        self.jobs = jobs
        self.job_id = job_id
        self.attempt = attempt
        self.interval = interval
        self._due = 0.0

    def moved_on(self) -> str | None:
        """The job's state when it is no longer evaluating this attempt (`missing` when deleted), else None."""
        record = self.jobs.get(self.job_id)
        if record is None:
            return "missing"
        if record.state is not JobState.EVALUATING or record.attempt != self.attempt:
            return record.state.value
        return None

    def check(self) -> None:
        """Raise EvaluationCancelled when the job has moved on; reads Redis at most once an interval."""
        clock = time.monotonic()
        if clock < self._due:
            return
        self._due = clock + self.interval
        state = self.moved_on()
        if state is not None:
            raise EvaluationCancelled(
                f"job {self.job_id} is {state}: evaluation of attempt {self.attempt} stopped"
            )

    @contextlib.contextmanager
    def watching(self, model: torch.nn.Module) -> Iterator[None]:
        """Check before each forward pass of `model` (and of an adapter later injected into it) in the block."""
        embeddings = model.get_input_embeddings()  # type: ignore[operator]
        handle = embeddings.register_forward_pre_hook(lambda module, args: self.check())
        try:
            yield
        finally:
            handle.remove()


def watching(watch: CancelWatch | None, model: torch.nn.Module) -> contextlib.AbstractContextManager[None]:
    """`watch.watching(model)`, or nothing for an evaluation no job waits on (a standalone evaluation)."""
    return watch.watching(model) if watch is not None else contextlib.nullcontext()
