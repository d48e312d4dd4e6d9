"""Packing short examples into full rows of `max_seq_length` tokens, without letting them see each other.

Rows are filled by best-fit-decreasing bin packing: longest example first, each into the row with the
least room that still holds it. Every example keeps its own position ids (0, 1, 2, … from its first token)
and its first token is never a target, so the loss is the one each example has alone: nothing predicts
example B's first token from example A's last.

Which attention implementations isolate the examples of a row, and how (measured with transformers 5.24
and torch 2.13; `tests/test_packing.py` checks the first two on every run):

- `sdpa`: a 4-D block-diagonal causal boolean mask (batch × 1 × L × L, True = may attend) passed as
  `attention_mask`, with the reset `position_ids`: logits equal the unpacked ones to ~1e-6.
- `eager`: the same mask as an additive float mask (0 where allowed, the dtype's minimum elsewhere); a
  boolean mask is *added* to the scores by eager attention (True → +1), so it does not isolate anything.
- `flash_attention_2`: no mask; the micro-batch is flattened into one padding-free row and FlashAttention's
  variable-length kernel finds the examples from where `position_ids` restart at 0. transformers only does
  this for a batch of one row (`_is_packed_sequence`), hence the flattening; a 2-D `attention_mask` would
  switch it back to ordinary padding and let the examples of a row attend to each other.
- Anything else (`flex_attention`, hub kernels, …): not supported; `packing_mode` returns None and the
  trainer falls back to ordinary padded batches, with a warning naming the implementation.

`position_ids` alone are not enough with sdpa or eager: transformers infers packed sequences from them only
when no attention mask and no KV cache are passed (`use_cache=False`), so a model called with its default
`use_cache=True` lets the examples attend to each other. The explicit 4-D mask does not depend on that.

Padding after the last example of a row is a segment of its own (it attends only to padding), so no
query row of the mask is empty: an all-masked row would give NaN in sdpa, and NaN × 0 attention weight
would still poison the real tokens.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from shared.chat_data import IGNORE_INDEX, TokenizedExample

PackingMode = Literal["bool_mask", "float_mask", "position_ids"]

# attention implementation → how its packed rows isolate examples (see the module docstring)
MODES: dict[str, PackingMode] = {
    "sdpa": "bool_mask",
    "eager": "float_mask",
    "flash_attention_2": "position_ids",
}


def packing_mode(attn_implementation: str | None) -> PackingMode | None:
    """How to isolate packed examples for `model.config._attn_implementation`; None: packing unsupported."""
    return MODES.get(attn_implementation or "")


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


def collate_packed(
    rows: Sequence[Sequence[TokenizedExample]],
    pad_token_id: int,
    mode: PackingMode,
    *,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """A micro-batch of packed rows: input_ids, labels, position_ids, token_mask (1 on real tokens) and,
    for the mask modes, a 4-D `attention_mask` (batch × 1 × L × L) that lets each token attend only to
    the earlier tokens of its own example. `dtype` is the float mask's (the model's dtype).

    Each row is right-padded to the longest row of the batch. "position_ids" mode flattens the batch into
    one padding-free row and returns no attention_mask (see the module docstring).
    """
    if mode == "position_ids":
        rows = [[example for row in rows for example in row]]
    width = max(sum(len(example.input_ids) for example in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    token_mask = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for s, example in enumerate(row):
            n = len(example.input_ids)
            input_ids[r, at : at + n] = torch.tensor(example.input_ids)
            labels[r, at : at + n] = torch.tensor(example.labels)
            # Never a target: token_stats would otherwise predict it from the previous example's last token.
            labels[r, at] = IGNORE_INDEX
            position_ids[r, at : at + n] = torch.arange(n)
            token_mask[r, at : at + n] = 1
            segments[r, at : at + n] = s
            at += n
        # The padding tail: a segment of its own, with positions of its own.
        position_ids[r, at:] = torch.arange(width - at)
        segments[r, at:] = len(row)
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "token_mask": token_mask}
    if mode == "position_ids":
        return batch
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    allowed = (segments[:, :, None] == segments[:, None, :]) & causal
    if mode == "bool_mask":
        batch["attention_mask"] = allowed[:, None]
    else:
        additive = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
        batch["attention_mask"] = additive[:, None]
    return batch
