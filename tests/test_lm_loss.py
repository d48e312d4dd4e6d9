"""The loss from logits kept only where a label is trained (shared/ml/lm_loss.py) is the full-logits loss:
per example, in sum, in accuracy and in gradient, padded or packed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, TaskType, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from shared.ml.builtin_models import build_tiny_chat_model
from shared.ml.chat_data import IGNORE_INDEX, TokenizedExample, collate, read_conversations, tokenize_chat
from shared.ml.lm_loss import (
    label_logits,
    label_token_stats,
    summed_cross_entropy,
    supports_kept_logits,
    trained_positions,
)
from shared.ml.lm_metrics import token_stats
from shared.ml.packing import collate_packed
from shared.ml.preference_metrics import pair_logps, sequence_logps
from shared.planning.packing import pack

PAD_ID = 258  # <|pad|> of the built-in tiny models
DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "identity_chat.jsonl"
INPUTS = ("input_ids", "attention_mask", "position_ids")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("models") / "llama")


@pytest.fixture(scope="module")
def examples(model_dir: Path) -> list[TokenizedExample]:
    """8 real conversations of 81-121 tokens: prompts masked, except in every third one."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    conversations = read_conversations(DATA, DATA.name)[:8]
    return [tokenize_chat(tokenizer, m, 256, train_on_inputs=i % 3 == 2) for i, m in enumerate(conversations)]


@pytest.fixture(scope="module")
def alone(model_dir: Path, examples: list[TokenizedExample]) -> list[float]:
    """The plain path: each example alone, every position's logits, cross-entropy summed where trained."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    losses = []
    with torch.no_grad():
        for example in examples:
            batch = collate([example], PAD_ID)
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
            logits = model(**inputs, use_cache=False).logits
            losses.append(F.cross_entropy(logits[0, :-1], batch["labels"][0, 1:], reduction="sum").item())
    return losses


def test_trained_positions_are_those_followed_by_a_trained_label() -> None:
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 6, IGNORE_INDEX], [1, IGNORE_INDEX, 2, 3, 4]])

    assert trained_positions(labels).tolist() == [
        [False, True, True, False, False],
        [False, True, True, True, False],
    ]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_kept_logits_give_each_example_its_full_logits_loss(
    model_dir: Path, examples: list[TokenizedExample], alone: list[float], packed: bool
) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if packed:
        rows = pack([len(e.input_ids) for e in examples], 256)
        batch = collate_packed([[examples[i] for i in row] for row in rows], PAD_ID, "bool_mask")
        order = [i for row in rows for i in row]  # examples in row-major order, as the kept rows are
    else:
        batch, order = collate(examples, PAD_ID), list(range(len(examples)))
    inputs = {k: batch[k] for k in INPUTS if k in batch}

    with torch.no_grad():
        logits, targets, rows_of = label_logits(model, inputs, batch["labels"], kept=True)
        token_losses = F.cross_entropy(logits, targets, reduction="none")
        full = token_stats(model(**inputs, use_cache=False).logits, batch["labels"])
        kept = label_token_stats(model, inputs, batch["labels"], kept=True)

    # Split the kept rows by example: packed rows hold several, each with its own trained positions.
    counts = [examples[i].n_trainable for i in order]
    got = [chunk.sum().item() for chunk in token_losses.split(counts)]
    assert len(targets) == sum(counts) == int(full.n_tokens) == int(kept.n_tokens)
    assert rows_of.tolist() == sorted(rows_of.tolist())
    # Measured: at most 6e-5 nats on summed losses of up to 685 (9e-8 relative): fp32 summation order only.
    assert got == pytest.approx([alone[i] for i in order], rel=1e-6, abs=1e-4)
    assert kept.loss_sum.item() == pytest.approx(full.loss_sum.item(), rel=1e-6)
    assert int(kept.n_correct) == int(full.n_correct)


def test_kept_logits_give_the_full_logits_gradient(model_dir: Path, examples: list[TokenizedExample]) -> None:
    """Every weight trains here, lm_head included, so the gradient of its kept rows is checked too."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).train()  # dropout is 0 in these models
    batch = collate(examples, PAD_ID)
    inputs = {k: batch[k] for k in INPUTS if k in batch}

    def gradients(kept: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        label_token_stats(model, inputs, batch["labels"], kept=kept).loss_sum.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    full, kept = gradients(kept=False), gradients(kept=True)

    # Measured: at most 1.4e-7 of the largest gradient entry of any tensor (summation order only).
    for name, grad in full.items():
        assert (kept[name] - grad).abs().max() <= 1e-5 * grad.abs().max(), name


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_summed_cross_entropy_is_torch_cross_entropy_in_value_gradient_and_accuracy(smoothing: float) -> None:
    """float64, so that only the formula could differ: the fewer-pass loss against F.cross_entropy."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 1000, generator=generator, dtype=torch.float64) * 4
    targets = torch.randint(0, 1000, (64,), generator=generator)
    targets[:8] = logits[:8].argmax(dim=-1)  # some rows predict their target
    ours, theirs = logits.clone().requires_grad_(), logits.clone().requires_grad_()

    loss, n_correct = summed_cross_entropy(ours, targets, smoothing)
    (2.5 * loss).backward()
    want = F.cross_entropy(theirs, targets, reduction="sum", label_smoothing=smoothing)
    (2.5 * want).backward()

    assert loss.item() == pytest.approx(want.item(), rel=1e-12)
    assert (ours.grad - theirs.grad).abs().max().item() < 1e-12
    assert int(n_correct) == int((logits.argmax(dim=-1) == targets).sum()) >= 8


def test_transformers_models_keep_logits_under_an_adapter_and_other_code_gets_full_logits(
    model_dir: Path,
) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lora = LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, target_modules="all-linear")

    class RemoteCode(torch.nn.Module):  # stands for trust_remote_code classes: they may take only an int
        def forward(self, input_ids: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
            return input_ids

    assert supports_kept_logits(model)
    assert supports_kept_logits(get_peft_model(model, lora))
    assert not supports_kept_logits(RemoteCode())


def test_pair_logps_from_kept_logits_are_the_sequence_logps_of_the_full_logits(
    model_dir: Path, examples: list[TokenizedExample]
) -> None:
    """DPO's summed reply log-probabilities (shared/ml/preference_metrics.py) take the kept path."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    batch = collate(examples, PAD_ID)

    with torch.no_grad():
        got, got_n = pair_logps(model, batch)
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        want, want_n = sequence_logps(full.logits, batch["labels"])

    assert torch.equal(got_n, want_n)
    assert got.tolist() == pytest.approx(want.tolist(), rel=1e-6, abs=1e-4)
