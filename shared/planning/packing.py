"""Which examples share a packed row: best-fit-decreasing bin packing on token lengths alone.

Rows are filled longest example first, each into the row with the least room that still holds it. This
half needs no tensors, so the estimate and the "auto" settings (planning) count rows and padded tokens
exactly as the trainer will build them; `shared/ml/packing.py` turns the rows into micro-batches.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from dataclasses import dataclass


def pack(lengths: Sequence[int], max_seq_length: int, order: Sequence[int] | None = None) -> list[list[int]]:
    """Best-fit-decreasing: rows of example indices whose lengths (each capped at `max_seq_length`) sum to
    at most `max_seq_length`.

    Deterministic. Examples of equal length are taken in `order` (default: index order); which of them
    lands in which row never changes the number of rows or their fill, only the row contents.
    """
    if max_seq_length < 1:
        raise ValueError(f"max_seq_length must be positive, not {max_seq_length}")
    sizes = [min(max(n, 0), max_seq_length) for n in lengths]
    indices = list(range(len(sizes))) if order is None else list(order)
    if sorted(indices) != list(range(len(sizes))):
        raise ValueError("order must be a permutation of the example indices")
    indices.sort(key=lambda i: -sizes[i])  # stable: ties keep `order`
    rows: list[list[int]] = []
    # Open rows by room left: `rooms` is the sorted list of distinct rooms, `by_room` their rows (a stack
    # each). At most max_seq_length + 1 distinct rooms, so lookups stay cheap however many rows there are.
    rooms: list[int] = []
    by_room: dict[int, list[int]] = {}
    for i in indices:
        size = sizes[i]
        at = bisect.bisect_left(rooms, size)
        if at < len(rooms):
            room = rooms[at]
            row = by_room[room].pop()
            if not by_room[room]:
                del by_room[room]
                rooms.pop(at)
        else:
            room, row = max_seq_length, len(rows)
            rows.append([])
        rows[row].append(i)
        left = room - size
        if left not in by_room:
            by_room[left] = []
            bisect.insort(rooms, left)
        by_room[left].append(row)
    return rows


def packed_row_count(lengths: Sequence[int], max_seq_length: int) -> int:
    """Exact number of packed rows per epoch for examples of these token lengths (whole conversations or
    already truncated: each is capped at `max_seq_length`). The same every epoch, whatever the shuffle."""
    return len(pack(lengths, max_seq_length))


@dataclass(frozen=True)
class PackingStats:
    rows: int
    tokens: int  # real (non-pad) tokens, each example capped at max_seq_length
    capacity: int  # rows × max_seq_length

    @property
    def fill_ratio(self) -> float:
        """Share of the rows' capacity holding real tokens (1 - padding share at fixed-length rows)."""
        return self.tokens / self.capacity if self.capacity else 0.0


def packing_stats(lengths: Sequence[int], max_seq_length: int) -> PackingStats:
    rows = packed_row_count(lengths, max_seq_length)
    tokens = sum(min(n, max_seq_length) for n in lengths)
    return PackingStats(rows=rows, tokens=tokens, capacity=rows * max_seq_length)


def epoch_rows(lengths: Sequence[int], max_seq_length: int, seed: int, epoch: int) -> list[list[int]]:
    """The packed rows of one epoch, in training order: the examples shuffled with (seed, epoch), packed,
    and the rows shuffled (best-fit-decreasing leaves them sorted longest example first)."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    rows = pack(lengths, max_seq_length, order)
    rng.shuffle(rows)
    return rows


def packed_padded_tokens(
    lengths: Sequence[int], max_seq_length: int, micro_batch_size: int, seed: int, n_epochs: int
) -> int:
    """Tokens computed over all epochs with packing and mask isolation (sdpa, eager): each micro-batch of
    `micro_batch_size` rows is padded to its longest row, exactly as the trainer's batches are.
    (With flash_attention_2 nothing is padded: the computed tokens are the real tokens.)"""
    total = 0
    for epoch in range(1, n_epochs + 1):
        fills = [
            sum(min(lengths[i], max_seq_length) for i in row)
            for row in epoch_rows(lengths, max_seq_length, seed, epoch)
        ]
        total += sum(
            max(fills[i : i + micro_batch_size]) * len(fills[i : i + micro_batch_size])
            for i in range(0, len(fills), micro_batch_size)
        )
    return total
