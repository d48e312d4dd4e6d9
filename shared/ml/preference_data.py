"""Preference examples (a prompt, a chosen and a rejected reply) → token pairs, shared by trainer and evaluator.

Each side is the prompt + reply conversation rendered with the tokenizer's own chat template by
`chat_data.tokenize_chat`, with the prompt's messages marked `"weight": 0`: labels cover the reply alone
(its content and end-of-turn token), located the same template-checked way as in supervised training. The
prompt's tokens are therefore identical on both sides, which `PreferencePair` checks rather than assumes.

Too long a pair is cut so that both sides still differ where they should: the replies keep their
beginning (where a preference mostly shows), the prompt keeps its end (the latest turn and the template's
generation prompt, which the reply follows), and at least half of `max_length` stays for the replies. So a
reply is never cut away whole, but replies that differ only past the cut become the same tokens on both
sides: such a pair teaches nothing and is skipped (`tokenize_pairs`), as chat data skips the examples
truncation leaves nothing to learn (`chat_data.Skipped`).

Batches put the chosen sides in the first half of the rows and the rejected sides in the second, so one
forward pass scores both (`collate_pairs`).
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from shared.data.formats import Example, read_examples
from shared.ml.chat_data import (
    IGNORE_INDEX,
    DataError,
    Messages,
    Skipped,
    TokenizedExample,
    collate,
    tokenize_chat,
)

DEFAULT_GROUP_FIELD = "group"  # Example.fields key whose values `evaluate_preferences` reports by_group


@dataclass
class PreferencePair:
    chosen: TokenizedExample  # prompt + chosen reply; labels on the reply only
    rejected: TokenizedExample  # the same prompt tokens + rejected reply
    prompt_length: int  # tokens of the (possibly cut) prompt at the start of both sides
    group: str | None  # the example's grouping value (fields[group_field]) as a string, if it has one
    truncated: bool  # the prompt or a reply was cut to fit max_length
    cut_away: bool = False  # cutting left both sides the same tokens (uncut, they differ): nothing to learn

    @property
    def n_tokens(self) -> int:
        """Non-pad tokens of both sides: the prompt is processed twice, once with each reply."""
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)


def read_preference_examples(path: Path, filename: str) -> list[Example]:
    """The examples of a preference dataset (OpenAI DPO rows, prompt/chosen/rejected, LLaMA-Factory's
    sharegpt ranking rows; any container shared.data.formats reads); `filename` tells its container."""
    with open(path, "rb") as f:
        examples = list(read_examples(f, filename=filename))
    if examples and examples[0].kind != "preference":
        raise DataError(f"{filename} holds {examples[0].kind} examples, not preference pairs")
    return examples


def tokenize_pair(
    tokenizer: PreTrainedTokenizerBase,
    example: Example,
    max_length: int,
    *,
    eos_token_ids: Collection[int] | None = None,
    group_field: str | None = DEFAULT_GROUP_FIELD,
) -> PreferencePair:
    """Token ids and labels of both sides of one preference example, cut to `max_length` tokens each."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, not {max_length}")
    if not example.messages or not example.chosen or not example.rejected:
        raise DataError("a preference example needs prompt messages, a chosen and a rejected reply")
    # Weight 0 on the prompt: earlier assistant turns are context, not something either side is scored on.
    prompt: Messages = [{**m, "weight": 0} for m in example.messages]
    sides = []
    for reply in (example.chosen, example.rejected):
        messages = prompt + [{k: v for k, v in m.items() if k != "weight"} for m in reply]
        # Uncut here: the pair is cut below, both sides alike.
        sides.append(tokenize_chat(tokenizer, messages, sys.maxsize, eos_token_ids=eos_token_ids))
    chosen, rejected = sides
    prompt_length = _first_label(chosen)
    same_prompt = chosen.input_ids[:prompt_length] == rejected.input_ids[:prompt_length]
    if _first_label(rejected) != prompt_length or not same_prompt:
        raise DataError("the chat template renders the prompt differently before the two replies")

    longest_reply = max(len(chosen.input_ids), len(rejected.input_ids)) - prompt_length
    keep = min(prompt_length, max(max_length - longest_reply, max_length // 2))
    cut = prompt_length - keep  # prompt tokens dropped from its start
    truncated = cut > 0 or keep + longest_reply > max_length
    differ = chosen.input_ids != rejected.input_ids
    chosen, rejected = (_cut(side, cut, max_length) for side in (chosen, rejected))
    cut_away = differ and chosen.input_ids == rejected.input_ids
    group = example.fields.get(group_field) if group_field else None
    return PreferencePair(chosen, rejected, keep, None if group is None else str(group), truncated, cut_away)


def tokenize_preferences(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    max_length: int,
    *,
    eos_token_ids: Collection[int] | None = None,
    dataset: str = "training",
    group_field: str | None = DEFAULT_GROUP_FIELD,
) -> tuple[list[PreferencePair], list[str]]:
    """`tokenize_pairs`: the pairs to train on (or score), and warnings about the others."""
    tokenized = tokenize_pairs(
        tokenizer, examples, max_length, eos_token_ids=eos_token_ids, dataset=dataset, group_field=group_field
    )
    skipped = [tokenized.skipped.warning()] if tokenized.skipped.count else []
    return tokenized.pairs, skipped + tokenized.warnings


@dataclass
class TokenizedPairs:
    pairs: list[PreferencePair]  # the pairs left to train on, in the order of the examples
    skipped: Skipped  # the pairs cutting left with nothing to learn, left out
    warnings: list[str]  # about the pairs left: cut, or the same on both sides


def tokenize_pairs(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    max_length: int,
    *,
    eos_token_ids: Collection[int] | None = None,
    dataset: str = "training",
    group_field: str | None = DEFAULT_GROUP_FIELD,
) -> TokenizedPairs:
    """`tokenize_pair` every example; errors name the example.

    Pairs whose replies differ only beyond what `max_length` keeps are cut to the same tokens on both
    sides: they teach nothing and are skipped by the rule of `chat_data.Skipped.check` (the dataset fails
    when fewer than half its pairs are left). Warnings name the pairs skipped, the pairs cut, and pairs whose
    two sides are the same even uncut (a data mistake): `warnings` (`tokenize_preferences` adds the skip).
    """
    pairs = []
    for i, example in enumerate(examples):
        try:
            pairs.append(
                tokenize_pair(
                    tokenizer, example, max_length, eos_token_ids=eos_token_ids, group_field=group_field
                )
            )
        except DataError as exc:
            raise DataError(f"{dataset} example {i} ({_source(example, i)}): {exc}") from exc
    cut = [i for i, pair in enumerate(pairs) if pair.cut_away]
    skipped = Skipped(
        dataset=dataset, total=len(pairs), indices=tuple(cut), sources=tuple(_source(examples[i], i) for i in cut),
        max_length=max_length, what="preference pairs",
        why="cutting leaves their chosen and rejected sides the same tokens, the replies differing only past the cut",
    )  # fmt: skip
    skipped.check()
    warnings = []
    kept = skipped.keep(list(range(len(pairs))))
    truncated = [i for i in kept if pairs[i].truncated]
    if truncated:
        first = truncated[0]
        warnings.append(
            f"{len(truncated)} of {len(kept)} {dataset} preference pairs are longer than the maximum "
            f"sequence length ({max_length} tokens) and were cut, e.g. example {first} "
            f"({_source(examples[first], first)}): prompts keep their end and replies their beginning"
        )
    same = [i for i in kept if pairs[i].chosen.input_ids == pairs[i].rejected.input_ids]
    if same:
        first = same[0]
        warnings.append(
            f"{len(same)} of {len(kept)} {dataset} preference pairs have the same chosen and rejected tokens, "
            f"e.g. example {first} ({_source(examples[first], first)}); they teach nothing"
        )
    return TokenizedPairs(skipped.keep(pairs), skipped, warnings)


def collate_pairs(pairs: Sequence[PreferencePair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch of 2 × len(pairs) rows: the chosen sides, then the rejected sides."""
    return collate([pair.chosen for pair in pairs] + [pair.rejected for pair in pairs], pad_token_id)


def iter_preference_batches(
    pairs: Sequence[PreferencePair], batch_size: int, pad_token_id: int
) -> Iterator[dict[str, Any]]:
    """Evaluation batches of `batch_size` pairs, longest first (less padding; an out-of-memory shows at
    once). Each also holds `groups`: the pairs' grouping values (None where a pair has none)."""
    ordered = sorted(pairs, key=lambda pair: pair.n_tokens, reverse=True)
    for i in range(0, len(ordered), batch_size):
        chunk = ordered[i : i + batch_size]
        batch: dict[str, Any] = collate_pairs(chunk, pad_token_id)
        batch["groups"] = [pair.group for pair in chunk]
        yield batch


def _first_label(example: TokenizedExample) -> int:
    """Where the reply starts: its first labelled token."""
    start = next((i for i, label in enumerate(example.labels) if label != IGNORE_INDEX), None)
    if start is None:
        raise DataError("the chat template rendered no tokens for a reply")
    return start


def _cut(example: TokenizedExample, start: int, max_length: int) -> TokenizedExample:
    """Drop `start` tokens from the front and keep at most `max_length` of the rest."""
    end = start + max_length
    truncated = start > 0 or len(example.input_ids) > end
    return TokenizedExample(example.input_ids[start:end], example.labels[start:end], truncated)


def _source(example: Example, i: int) -> str:
    return example.source or f"line {i + 1}"
