"""The held-out validation split made when a job has no validation file: deterministic in the seed,
so the data preparation, the trainer and the evaluator all see the same rows."""

from __future__ import annotations

import random
from typing import TypeVar

T = TypeVar("T")

HOLDOUT_FRACTION = 0.1
MAX_HOLDOUT_ROWS = 1000


def holdout_split(rows: list[T], seed: int) -> tuple[list[T], list[T]]:
    """(train, validation): 10 % of the rows (at least 1, at most 1,000) held out."""
    shuffled = rows[:]
    random.Random(seed).shuffle(shuffled)
    n_valid = max(1, min(MAX_HOLDOUT_ROWS, round(len(rows) * HOLDOUT_FRACTION)))
    return shuffled[n_valid:], shuffled[:n_valid]
