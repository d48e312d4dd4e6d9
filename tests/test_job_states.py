"""The job state machine (shared/platform/job_states.py): which status changes are legal, and how they read."""

from __future__ import annotations

import itertools

import pytest

from shared.platform.job_states import (
    TERMINAL_STATES,
    TRANSITIONS,
    IllegalTransition,
    JobState,
    check_transition,
    is_terminal,
    public_status,
)

NON_FINAL_STATES = [s for s in JobState if s not in TERMINAL_STATES]
FINAL_STATES = [JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED]


def test_the_happy_path_from_validating_files_to_succeeded_is_legal() -> None:
    path = [
        JobState.VALIDATING_FILES,
        JobState.QUEUED,
        JobState.RUNNING,
        JobState.EVALUATING,
        JobState.SUCCEEDED,
    ]
    for current, target in itertools.pairwise(path):
        check_transition(current, target)  # raises if illegal


@pytest.mark.parametrize("current", NON_FINAL_STATES, ids=str)
@pytest.mark.parametrize("target", [JobState.FAILED, JobState.CANCELLED], ids=str)
def test_failed_and_cancelled_are_reachable_from_every_non_final_state(
    current: JobState, target: JobState
) -> None:
    check_transition(current, target)


@pytest.mark.parametrize("current", [JobState.QUEUED, JobState.RUNNING], ids=str)
def test_queued_and_running_jobs_can_be_paused(current: JobState) -> None:
    check_transition(current, JobState.PAUSED)


def test_a_paused_job_resumes_by_going_back_to_queued() -> None:
    check_transition(JobState.PAUSED, JobState.QUEUED)


@pytest.mark.parametrize(
    "current", [JobState.VALIDATING_FILES, JobState.EVALUATING, JobState.PAUSED], ids=str
)
def test_jobs_cannot_be_paused_outside_queued_and_running(current: JobState) -> None:
    with pytest.raises(IllegalTransition):
        check_transition(current, JobState.PAUSED)


def test_a_preempted_trainer_sends_its_job_back_to_queued() -> None:
    check_transition(JobState.RUNNING, JobState.QUEUED)


def test_a_preempted_evaluator_keeps_its_job_in_evaluating() -> None:
    check_transition(JobState.EVALUATING, JobState.EVALUATING)


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (JobState.VALIDATING_FILES, JobState.RUNNING),
        (JobState.QUEUED, JobState.EVALUATING),
        (JobState.QUEUED, JobState.SUCCEEDED),
        (JobState.RUNNING, JobState.SUCCEEDED),
        (JobState.PAUSED, JobState.RUNNING),
        (JobState.EVALUATING, JobState.RUNNING),
    ],
    ids=lambda s: str(s),
)
def test_skipping_a_stage_is_illegal(current: JobState, target: JobState) -> None:
    with pytest.raises(IllegalTransition):
        check_transition(current, target)


@pytest.mark.parametrize("current", FINAL_STATES, ids=str)
@pytest.mark.parametrize("target", list(JobState), ids=str)
def test_terminal_states_have_no_way_out(current: JobState, target: JobState) -> None:
    with pytest.raises(IllegalTransition) as caught:
        check_transition(current, target)
    assert caught.value.current is current
    assert caught.value.target is target


def test_an_illegal_transition_message_names_both_states() -> None:
    with pytest.raises(IllegalTransition, match=r"^a job cannot go from succeeded to running$"):
        check_transition(JobState.SUCCEEDED, JobState.RUNNING)


def test_every_state_has_a_transition_entry() -> None:
    assert set(TRANSITIONS) == set(JobState)


def test_exactly_succeeded_failed_and_cancelled_are_terminal() -> None:
    assert {s for s in JobState if is_terminal(s)} == set(FINAL_STATES)


def test_public_status_shows_evaluating_as_running() -> None:
    assert public_status(JobState.EVALUATING) == "running"


def test_public_status_shows_paused_as_queued_since_the_sdk_types_lack_paused() -> None:
    assert public_status(JobState.PAUSED) == "queued"


@pytest.mark.parametrize(
    "state", [s for s in JobState if s not in (JobState.EVALUATING, JobState.PAUSED)], ids=str
)
def test_public_status_is_the_state_value_for_every_other_state(state: JobState) -> None:
    assert public_status(state) == state.value


def test_every_public_status_is_one_the_openai_sdk_accepts() -> None:
    from typing import get_args

    from openai.types.fine_tuning import FineTuningJob

    accepted = set(get_args(FineTuningJob.model_fields["status"].annotation))
    assert {public_status(s) for s in JobState} <= accepted
