"""The job state machine: the one place that says which status changes are legal.

Internal states are OpenAI's status values plus `evaluating` (a finer stage of `running`) and
`paused`. The API's `status` keeps to the values the openai SDK's types accept (its strict mode
rejects any other), so `evaluating` reads `running` and `paused` reads `queued` (waiting, not
training); the exact state is the job's `stage`.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    EVALUATING = "evaluating"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

# A trainer that is preempted sends its job back to `queued`; an evaluator that is preempted
# sends its job back to `evaluating` (re-enqueued), which is why that self-loop exists.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.VALIDATING_FILES: frozenset({JobState.QUEUED, JobState.FAILED, JobState.CANCELLED}),
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.PAUSED, JobState.FAILED, JobState.CANCELLED}),
    JobState.RUNNING: frozenset(
        {JobState.EVALUATING, JobState.QUEUED, JobState.PAUSED, JobState.FAILED, JobState.CANCELLED}
    ),
    JobState.EVALUATING: frozenset(
        {JobState.EVALUATING, JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}
    ),
    JobState.PAUSED: frozenset({JobState.QUEUED, JobState.FAILED, JobState.CANCELLED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


class IllegalTransition(Exception):
    def __init__(self, current: JobState, target: JobState):
        super().__init__(f"a job cannot go from {current.value} to {target.value}")
        self.current = current
        self.target = target


def check_transition(current: JobState, target: JobState) -> None:
    if target not in TRANSITIONS[current]:
        raise IllegalTransition(current, target)


def is_terminal(state: JobState) -> bool:
    return state in TERMINAL_STATES


PUBLIC_STATUS = {JobState.EVALUATING: JobState.RUNNING, JobState.PAUSED: JobState.QUEUED}


def public_status(state: JobState) -> str:
    """The OpenAI `status` value for a state (see the module docstring)."""
    return PUBLIC_STATUS.get(state, state).value
