"""Preference examples become token pairs that share their prompt and carry loss on the replies alone."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from shared.data.formats import Example, read_examples
from shared.ml.builtin_models import build_tiny_chat_model
from shared.ml.chat_data import IGNORE_INDEX, DataError
from shared.ml.preference_data import (
    collate_pairs,
    iter_preference_batches,
    tokenize_pair,
    tokenize_pairs,
    tokenize_preferences,
)

GENERATION_PROMPT = "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerBase:
    """The tiny chat model's byte-level tokenizer: one token per ASCII character, ChatML template."""
    return AutoTokenizer.from_pretrained(build_tiny_chat_model(tmp_path_factory.mktemp("models") / "llama"))


def pair(prompt: str | list[dict], chosen: str, rejected: str, **fields: object) -> Example:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return Example(
        kind="preference",
        source="line 1",
        messages=messages,
        chosen=[{"role": "assistant", "content": chosen}],
        rejected=[{"role": "assistant", "content": rejected}],
        fields=dict(fields),
    )


def decode_labelled(tokenizer: PreTrainedTokenizerBase, labels: list[int]) -> str:
    return tokenizer.decode([t for t in labels if t != IGNORE_INDEX])


def test_labels_cover_each_reply_and_its_end_of_turn_token_only(tokenizer: PreTrainedTokenizerBase) -> None:
    tokenized = tokenize_pair(tokenizer, pair("Is water wet?", "Yes.", "Purple."), 512)

    assert decode_labelled(tokenizer, tokenized.chosen.labels) == "Yes.<|im_end|>"
    assert decode_labelled(tokenizer, tokenized.rejected.labels) == "Purple.<|im_end|>"
    assert not tokenized.truncated


def test_both_sides_start_with_the_same_prompt_tokens_ending_in_the_generation_prompt(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    tokenized = tokenize_pair(tokenizer, pair("Is water wet?", "Yes.", "Purple."), 512)

    n = tokenized.prompt_length
    assert tokenized.chosen.input_ids[:n] == tokenized.rejected.input_ids[:n]
    assert tokenizer.decode(tokenized.chosen.input_ids[:n]) == (
        "<|im_start|>user\nIs water wet?<|im_end|>\n" + GENERATION_PROMPT
    )
    assert set(tokenized.chosen.labels[:n]) == {IGNORE_INDEX}


def test_earlier_assistant_turns_of_the_prompt_are_context_not_trained(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    prompt = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
    ]
    tokenized = tokenize_pair(tokenizer, pair(prompt, "4", "5"), 512)

    assert decode_labelled(tokenizer, tokenized.chosen.labels) == "4<|im_end|>"
    assert decode_labelled(tokenizer, tokenized.rejected.labels) == "5<|im_end|>"


def test_openai_sharegpt_and_prompt_chosen_rejected_rows_give_the_same_pair(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    rows = [
        {
            "input": {"messages": [{"role": "user", "content": "Capital of France?"}]},
            "preferred_output": [{"role": "assistant", "content": "Paris."}],
            "non_preferred_output": [{"role": "assistant", "content": "Lyon."}],
        },
        {
            "conversations": [{"from": "human", "value": "Capital of France?"}],
            "chosen": {"from": "gpt", "value": "Paris."},
            "rejected": {"from": "gpt", "value": "Lyon."},
        },
        {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."},
    ]
    tokenized = []
    for row in rows:
        (example,) = read_examples(io.BytesIO(json.dumps(row).encode()), filename="pairs.jsonl")
        tokenized.append(tokenize_pair(tokenizer, example, 512))

    assert tokenized[0] == tokenized[1] == tokenized[2]


def test_a_long_pair_keeps_the_prompts_end_and_the_replies_beginning(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    prompt = "Background. " * 20 + "Question: which is better?"
    chosen, rejected = "The first one, because " + "a" * 60, "The second one, since " + "b" * 80

    tokenized = tokenize_pair(tokenizer, pair(prompt, chosen, rejected), 64)

    # Half of the length stays for the replies, however long the prompt.
    assert tokenized.prompt_length == 32
    assert tokenizer.decode(tokenized.chosen.input_ids[:32]).endswith(
        "which is better?<|im_end|>\n" + GENERATION_PROMPT
    )
    assert decode_labelled(tokenizer, tokenized.chosen.labels) == chosen[:32]
    assert decode_labelled(tokenizer, tokenized.rejected.labels) == rejected[:32]
    assert tokenized.truncated and tokenized.chosen.truncated and tokenized.rejected.truncated


def test_a_short_prompt_is_kept_whole_and_the_replies_get_the_rest(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    tokenized = tokenize_pair(tokenizer, pair("Hi", "x" * 100, "y" * 10), 64)

    full_prompt = "<|im_start|>user\nHi<|im_end|>\n" + GENERATION_PROMPT
    assert tokenizer.decode(tokenized.chosen.input_ids[: tokenized.prompt_length]) == full_prompt
    assert len(tokenized.chosen.input_ids) == 64
    assert decode_labelled(tokenizer, tokenized.rejected.labels) == "y" * 10 + "<|im_end|>"
    assert tokenized.truncated and not tokenized.rejected.truncated


def at(source: str, example: Example) -> Example:
    return dataclasses.replace(example, source=source)


def test_pairs_cut_to_the_same_tokens_are_skipped_and_named(tokenizer: PreTrainedTokenizerBase) -> None:
    examples = [
        at("line 1", pair("Hi", "Hello there.", "Go away." * 10)),
        at("line 2", pair("Hi", "Same words " * 10 + "then kind.", "Same words " * 10 + "then rude.")),
        at("line 3", pair("Yo", "Yes.", "No.")),
    ]

    tokenized = tokenize_pairs(tokenizer, examples, 64, dataset="validation")
    pairs, warnings = tokenize_preferences(tokenizer, examples, 64, dataset="validation")

    assert tokenized.pairs == pairs and [p.chosen.input_ids for p in pairs] == [
        tokenize_pair(tokenizer, examples[i], 64).chosen.input_ids for i in (0, 2)
    ]
    assert tokenized.skipped.summary() == {"count": 1, "of": 3, "sources": ["line 2"]}
    assert warnings == [
        "Skipped 1 of 3 validation preference pairs (line 2): at the maximum sequence length (64 tokens), "
        "cutting leaves their chosen and rejected sides the same tokens, the replies differing only past the "
        "cut; they are not trained on",
        "1 of 2 validation preference pairs are longer than the maximum sequence length (64 tokens) and were "
        "cut, e.g. example 0 (line 1): prompts keep their end and replies their beginning",
    ]


def test_pairs_the_same_even_uncut_are_kept_with_a_warning(tokenizer: PreTrainedTokenizerBase) -> None:
    pairs, warnings = tokenize_preferences(
        tokenizer, [pair("Hi", "Same.", "Same."), pair("Yo", "A", "B")], 64
    )

    assert len(pairs) == 2 and not pairs[0].cut_away
    assert warnings == [
        "1 of 2 training preference pairs have the same chosen and rejected tokens, e.g. example 0 (line 1); "
        "they teach nothing"
    ]


def test_preference_data_fails_when_fewer_than_half_its_pairs_are_left(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    alike = pair("Hi", "Same words " * 10 + "then kind.", "Same words " * 10 + "then rude.")
    examples = [pair("Yo", "Yes.", "No.")] + [at(f"item {i}", alike) for i in range(2, 5)]

    with pytest.raises(DataError, match=r"^3 of 4 training preference pairs have nothing left to train on .*"
                       r"\(item 2, item 3, item 4\)\. Only 1 would be left"):  # fmt: skip
        tokenize_preferences(tokenizer, examples, 64)


def test_a_batch_holds_the_chosen_sides_then_the_rejected_sides_right_padded(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    pairs, _ = tokenize_preferences(tokenizer, [pair("Hi", "A", "BBBB"), pair("Yo", "CC", "D")], 512)

    batch = collate_pairs(pairs, pad_token_id=tokenizer.pad_token_id)

    sides = [pairs[0].chosen, pairs[1].chosen, pairs[0].rejected, pairs[1].rejected]
    assert batch["input_ids"].shape == (4, max(len(side.input_ids) for side in sides))
    for row, side in enumerate(sides):
        n = len(side.input_ids)
        assert batch["input_ids"][row, :n].tolist() == side.input_ids
        assert batch["labels"][row, :n].tolist() == side.labels
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert set(batch["labels"][row, n:].tolist()) <= {IGNORE_INDEX}


def test_evaluation_batches_carry_each_pairs_group(tokenizer: PreTrainedTokenizerBase) -> None:
    examples = [
        pair("Hi", "A", "B", group="greeting"),
        pair("Sum?", "4", "5"),
        pair("Hey", "C", "D", group=7),
    ]
    pairs, _ = tokenize_preferences(tokenizer, examples, 512)

    batches = list(iter_preference_batches(pairs, batch_size=2, pad_token_id=tokenizer.pad_token_id))

    assert [len(batch["groups"]) for batch in batches] == [2, 1]
    assert sorted(map(str, (g for batch in batches for g in batch["groups"]))) == ["7", "None", "greeting"]
    assert all(len(batch["input_ids"]) == 2 * len(batch["groups"]) for batch in batches)


def test_the_demo_dataset_reads_as_preference_pairs() -> None:
    path = Path(__file__).parent / "fixtures" / "datasets" / "dpo_en_demo_300.json"  # the whole demo file
    with open(path, "rb") as f:
        examples = list(read_examples(f, filename=path.name))

    assert len(examples) == 300
    assert {example.kind for example in examples} == {"preference"}
    assert all(example.messages and example.chosen and example.rejected for example in examples)
