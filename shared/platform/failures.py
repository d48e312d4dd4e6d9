"""Turning an exception in a worker into the `error` a user sees on a failed job."""

from __future__ import annotations

from shared.platform.records import JobError


class ModelUnavailable(Exception):
    """A catalog model could not be materialised on this worker."""


class JobFailure(Exception):
    """A failure with a known, user-facing code (bad data, unusable model, budget reached...)."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


def classify(exc: BaseException) -> tuple[JobError, bool]:
    """The job error for `exc`, and whether it is expected (True) or a bug worth a traceback."""
    if isinstance(exc, JobFailure):
        return JobError(code=exc.code, message=exc.message, param=exc.param), True
    if isinstance(exc, ModelUnavailable):
        return JobError(code="model_unavailable", message=str(exc), param="model"), True
    name = type(exc).__name__
    if name == "OutOfMemoryError" or "out of memory" in str(exc).lower():
        message = (
            "the device ran out of memory; lower batch_size or max_seq_length, or use a larger GPU class"
        )
        return JobError(code="out_of_memory", message=message), True
    return JobError(code="internal_error", message=f"{name}: {exc}"), False
