"""The held-out validation split made when a job has no validation file: deterministic in its seed
(`holdout_seed`), so the estimate, the data preparation, the trainer and the evaluator all see the same
rows."""

from __future__ import annotations

import random
from typing import TypeVar

T = TypeVar("T")

HOLDOUT_FRACTION = 0.1
MAX_HOLDOUT_ROWS = 1000


def holdout_size(n_rows: int) -> int:
    """Rows held out: 10 % (at least 1, at most 1,000)."""
    return max(1, min(MAX_HOLDOUT_ROWS, round(n_rows * HOLDOUT_FRACTION)))


def suggested_split(n_rows: int) -> dict[str, int | str]:
    held_out = holdout_size(n_rows)
    return {
        "train": n_rows - held_out,
        "validation": held_out,
        "rule": "10% held out, at least 1, at most 1,000",
    }


def holdout_seed(seed: int | None, training_sha256: str) -> int:
    """The held-out split's seed: the job's own when the request gave one; else one taken from the training
    file's content, so that every job on the same data without a seed (each draws a random one for its
    training) and their estimates hold out the same rows: their evaluations compare on them, and the base
    model is scored on them once (the evaluator's base-results cache)."""
    return seed if seed is not None else int(training_sha256[:8], 16)


def holdout_split(rows: list[T], seed: int) -> tuple[list[T], list[T]]:
    """(train, validation): the held-out rows chosen at random with `seed` (`holdout_seed`)."""
    shuffled = rows[:]
    random.Random(seed).shuffle(shuffled)
    n_valid = holdout_size(len(rows))
    return shuffled[n_valid:], shuffled[:n_valid]
