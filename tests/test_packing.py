"""Packing: rows filled by best-fit-decreasing, and packed examples that cannot see each other (the loss
and the gradient of a packed batch are those of the same examples unpacked)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.modeling_flash_attention_utils import (
    _is_packed_sequence,
    prepare_fa_kwargs_from_position_ids,
)

from shared.ml.builtin_models import build_tiny_chat_model
from shared.ml.chat_data import IGNORE_INDEX, TokenizedExample, collate, read_conversations, tokenize_chat
from shared.ml.lm_metrics import token_stats
from shared.ml.packing import collate_packed, packing_mode
from shared.planning.estimate import padded_tokens_per_epoch, percentile
from shared.planning.packing import epoch_rows, pack, packed_padded_tokens, packed_row_count, packing_stats

PAD_ID = 258  # <|pad|> of the built-in tiny models
DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "identity_chat.jsonl"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("models") / "llama")


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def examples(tokenizer: PreTrainedTokenizerBase) -> list[TokenizedExample]:
    """12 real conversations of 81-121 tokens, every other one trained on its inputs too (so its first
    token has a label that packing must drop), and one truncated."""
    assert tokenizer.pad_token_id == PAD_ID
    conversations = read_conversations(DATA, DATA.name)[:12]
    examples = [
        tokenize_chat(tokenizer, messages, 100 if i == 3 else 256, train_on_inputs=i % 2 == 1)
        for i, messages in enumerate(conversations)
    ]
    assert [e.truncated for e in examples].count(True) == 1
    return examples


def check_rows(rows: list[list[int]], lengths: list[int], max_seq_length: int) -> None:
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(min(lengths[i], max_seq_length) for i in row) <= max_seq_length for row in rows)


def test_best_fit_decreasing_puts_each_example_in_the_fullest_row_that_holds_it() -> None:
    lengths = [5, 4, 3, 3, 2, 1, 20]

    rows = pack(lengths, 8)

    # 20 (capped at 8) fills a row; 5 opens a row, 4 another; 3 best fits the 5's row (room 3), the next 3
    # the 4's row (room 4 → 1); 2 fits nowhere; 1 best fits the 4's row (room 1).
    assert rows == [[6], [0, 2], [1, 3, 5], [4]]
    assert packed_row_count(lengths, 8) == 4
    check_rows(rows, lengths, 8)


def test_row_count_is_exact_and_the_same_every_epoch_while_rows_change() -> None:
    rng = random.Random(7)
    lengths = [rng.randint(1, 300) for _ in range(500)]

    count = packed_row_count(lengths, 512)
    epochs = [epoch_rows(lengths, 512, seed=3, epoch=epoch) for epoch in (1, 2, 3)]

    for rows in epochs:
        check_rows(rows, lengths, 512)
    assert [len(rows) for rows in epochs] == [count] * 3
    assert epochs[0] != epochs[1] != epochs[2]  # shuffled and packed again each epoch
    assert epoch_rows(lengths, 512, seed=3, epoch=2) == epochs[1]  # deterministic in (seed, epoch)
    assert packing_stats(lengths, 512).fill_ratio > 0.98
    assert count == -(-sum(lengths) // 512)  # as few rows as the tokens allow


def test_packing_cuts_the_padding_of_a_real_dataset(tokenizer: PreTrainedTokenizerBase) -> None:
    conversations = read_conversations(DATA, DATA.name)
    lengths = [len(tokenize_chat(tokenizer, messages, 1 << 20).input_ids) for messages in conversations]
    max_seq_length = percentile(lengths, 0.99)  # the "auto" sequence length

    stats = packing_stats(lengths, max_seq_length)
    unpacked = padded_tokens_per_epoch(lengths, 4, max_seq_length, seed=0)
    packed = packed_padded_tokens(lengths, max_seq_length, 4, seed=0, n_epochs=1)

    # identity_chat.jsonl, 91 rows of 74-378 tokens (p99 378): 16,354 tokens; batches of 4 padded to
    # their longest row compute 21,160 tokens (23 % padding), 45 packed rows in batches of 4 compute
    # 16,988 (3.7 % padding); the rows are 96.1 % full.
    assert (len(lengths), max_seq_length, stats.tokens, stats.rows) == (91, 378, 16354, 45)
    assert stats.fill_ratio == pytest.approx(0.9614, abs=1e-4)
    assert (unpacked, packed) == (21160, 16988)
    # The estimate is exact: the trainer's collated batches have exactly these shapes.
    examples = [TokenizedExample([0] * n, [IGNORE_INDEX] * n, False) for n in lengths]
    rows = epoch_rows(lengths, max_seq_length, seed=0, epoch=1)
    computed = 0
    for i in range(0, len(rows), 4):
        batch = collate_packed([[examples[j] for j in row] for row in rows[i : i + 4]], 0, "bool_mask")
        computed += batch["input_ids"].numel()
    assert computed == packed


def per_token_losses(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], **kwargs: object
) -> torch.Tensor:
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits = model(**inputs, **{"use_cache": False, **kwargs}).logits
    losses = F.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="none"
    )  # 0 where the label is IGNORE_INDEX
    return losses.view(logits.shape[0], -1)


def packed_batch(
    examples: list[TokenizedExample], implementation: str, max_seq_length: int = 256
) -> tuple[list[list[int]], dict[str, torch.Tensor]]:
    rows = pack([len(e.input_ids) for e in examples], max_seq_length)
    mode = packing_mode(implementation)
    assert mode is not None
    return rows, collate_packed([[examples[i] for i in row] for row in rows], PAD_ID, mode)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_packed_examples_have_exactly_their_unpacked_loss(
    model_dir: Path, examples: list[TokenizedExample], implementation: str
) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=implementation).eval()
    rows, batch = packed_batch(examples, implementation)
    assert max(len(row) for row in rows) > 1

    with torch.no_grad():
        alone = [per_token_losses(model, collate([e], PAD_ID))[0] for e in examples]
        packed = per_token_losses(model, batch)
        # Negative control: the same rows without the mask (transformers' default use_cache=True also
        # skips its own packed-sequence detection) let examples attend to each other.
        without_mask = {k: v for k, v in batch.items() if k != "attention_mask"}
        unmasked = per_token_losses(model, without_mask, use_cache=True)

    worst, leaked = 0.0, 0.0
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(examples[i].input_ids)
            # Losses of the tokens predicted inside the example: positions at .. at+n-2 predict at+1 .. at+n-1.
            assert torch.equal(batch["labels"][r, at + 1 : at + n], torch.tensor(examples[i].labels[1:]))
            assert batch["labels"][r, at] == IGNORE_INDEX  # never predicted from the previous example
            assert batch["position_ids"][r, at : at + n].tolist() == list(range(n))
            got, want = packed[r, at : at + n - 1], alone[i][: n - 1]
            worst = max(worst, abs(got.sum().item() - want.sum().item()), (got - want).abs().max().item())
            leaked = max(leaked, (unmasked[r, at : at + n - 1] - want).abs().max().item())
            at += n
        assert batch["token_mask"][r].sum() == at
    # Measured: 0.0 to 6e-5 on this CPU (fp32, the rounding of the sum depends on the thread count), for
    # summed losses of up to ~660 nats per example: 1e-7 relative. A leak moves losses by more than 0.1.
    assert worst < 1e-4
    # No example leaks into the loss of another through the batch's own padding either.
    assert packed.sum().item() == pytest.approx(sum(a.sum().item() for a in alone), rel=1e-6)
    assert leaked > 0.1  # the control: packing without the mask changes the losses


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_a_packed_step_has_the_gradient_of_the_unpacked_batch(
    model_dir: Path, examples: list[TokenizedExample], implementation: str
) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=implementation)
    model.train()  # dropout is 0 in these models: train mode changes nothing else

    def gradients(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
        model.zero_grad()
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        stats = token_stats(model(**inputs, use_cache=False).logits, batch["labels"])
        stats.loss_sum.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}, int(stats.n_tokens)

    unpacked, n_unpacked = gradients(collate(examples, PAD_ID))
    packed, n_packed = gradients(packed_batch(examples, implementation)[1])

    assert n_packed == n_unpacked == sum(e.n_trainable for e in examples)
    # Measured: at most 6e-7 of the largest gradient entry of any tensor (summation order only).
    for name, grad in unpacked.items():
        assert (packed[name] - grad).abs().max() <= 1e-5 * grad.abs().max(), name


def test_eager_attention_needs_the_additive_mask(model_dir: Path, examples: list[TokenizedExample]) -> None:
    """Why eager gets a float mask: eager attention adds a boolean mask to the scores (True → +1)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    _, boolean = packed_batch(examples, "sdpa")
    _, additive = packed_batch(examples, "eager")

    assert additive["attention_mask"].dtype == torch.float32
    assert torch.equal(additive["attention_mask"] == 0, boolean["attention_mask"])
    with torch.no_grad():
        right = model(**{k: additive[k] for k in ("input_ids", "attention_mask", "position_ids")}).logits
        wrong = model(**{k: boolean[k] for k in ("input_ids", "attention_mask", "position_ids")}).logits
    assert (right - wrong).abs().max() > 1e-2


def test_flash_attention_rows_are_flattened_and_split_by_position_ids(
    examples: list[TokenizedExample],
) -> None:
    """FlashAttention-2 (GPU only) isolates examples from where position_ids restart, in a batch of one
    row and without a mask: what transformers derives from the batch must be the example boundaries."""
    rows = [examples[:2], examples[2:5], examples[5:6]]

    mode = packing_mode("flash_attention_2")
    assert mode is not None
    batch = collate_packed(rows, PAD_ID, mode)

    lengths = [len(e.input_ids) for e in examples[:6]]
    assert "attention_mask" not in batch
    assert batch["input_ids"].shape == (1, sum(lengths))  # padding-free
    assert torch.equal(batch["token_mask"], torch.ones(1, sum(lengths), dtype=torch.long))
    assert _is_packed_sequence(batch["position_ids"], batch_size=1)
    (cu_seqlens, _), (max_length, _) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    assert cu_seqlens.tolist() == [sum(lengths[:i]) for i in range(7)]
    assert int(max_length) == max(lengths)
    starts = cu_seqlens[:-1].tolist()
    assert all(batch["labels"][0, s] == IGNORE_INDEX for s in starts)


def test_only_implementations_that_isolate_examples_are_packed() -> None:
    assert packing_mode("sdpa") == "bool_mask"
    assert packing_mode("eager") == "float_mask"
    assert packing_mode("flash_attention_2") == "position_ids"
    assert [packing_mode(name) for name in ("flex_attention", "flash_attention_3", None)] == [None] * 3
