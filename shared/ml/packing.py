"""Packing short examples into full rows of `max_seq_length` tokens, without letting them see each other.

Which examples share a row is planned from their lengths alone (`shared/planning/packing.py`); this
module builds the micro-batches of those rows. Every example keeps its own position ids (0, 1, 2, … from its first token)
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

The dense mask costs nothing measurable on a CPU, so sdpa keeps it there (torch 2.13, one thread, one
layer's attention forward and backward at batch 4 × 128 tokens, 4 heads of 64, rows of 1-3 examples):
sdpa with the boolean mask 3.72 ms, plain causal sdpa that does not isolate the examples 3.70 ms, sdpa
called per example 4.53 ms (small calls). `flex_attention` with a block mask has no backward on a CPU in
torch 2.13 ("FlexAttention does not support backward on CPU"), so it cannot train there. At these
lengths attention is about 3 % of a step; the output layer and the MLPs are the rest. On a GPU the
FlashAttention-2 variable-length path above is the one without a mask.

Padding after the last example of a row is a segment of its own (it attends only to padding), so no
query row of the mask is empty: an all-masked row would give NaN in sdpa, and NaN × 0 attention weight
would still poison the real tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch.utils.data import Dataset

from shared.ml.chat_data import IGNORE_INDEX, TokenizedExample
from shared.planning.packing import epoch_rows, packing_stats

PackingMode = Literal["bool_mask", "float_mask", "position_ids"]

# attention implementation → how its packed rows isolate examples (see the module docstring)
MODES: dict[str, PackingMode] = {
    "sdpa": "bool_mask",
    "eager": "float_mask",
    "flash_attention_2": "position_ids",
}


class PackedEpochs(Dataset):
    """The packed rows of the current epoch (`repack` before each): item i is row i's examples, in an
    order already shuffled (new each epoch), which the loader keeps."""

    def __init__(self, examples: list[TokenizedExample], max_seq_length: int, seed: int) -> None:
        self.examples = examples
        self.lengths = [len(example.input_ids) for example in examples]
        self.max_seq_length = max_seq_length
        self.seed = seed
        self.stats = packing_stats(self.lengths, max_seq_length)  # the same every epoch
        self.rows: list[list[int]] = []
        self.repack(1)

    def repack(self, epoch: int) -> None:
        self.rows = epoch_rows(self.lengths, self.max_seq_length, self.seed, epoch)

    def __len__(self) -> int:
        return self.stats.rows

    def __getitem__(self, i: int) -> list[TokenizedExample]:
        return [self.examples[j] for j in self.rows[i]]


def packing_mode(attn_implementation: str | None) -> PackingMode | None:
    """How to isolate packed examples for `model.config._attn_implementation`; None: packing unsupported."""
    return MODES.get(attn_implementation or "")


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
