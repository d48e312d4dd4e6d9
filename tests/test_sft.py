"""The supervised LoRA recipe on a tiny model: it learns, stops on request, saves a usable adapter."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.trainer.sft import SFTConfig, StepMetrics, train_sft
from shared.builtin_models import ARCHITECTURES, build_tiny_chat_model
from shared.chat_data import DataError, iter_batches, tokenize_chat
from shared.estimate import count_optimizer_steps
from shared.lm_metrics import evaluate_causal_lm


def qa(a: int, b: int) -> list[dict]:
    return [
        {"role": "user", "content": f"What is {a}+{b}?"},
        {"role": "assistant", "content": f"{a + b}"},
    ]


EXAMPLES = [qa(a, b) for a in range(1, 6) for b in range(1, 6)]  # 25: 20 to train, 5 to validate
LONG_REPLY = [
    {"role": "user", "content": "Add 10 and 20, please."},
    {"role": "assistant", "content": "10 plus 20 makes thirty, written 30."},
]


class RecordingHooks:
    def __init__(self, stop_after: int | None = None, action: str = "discard") -> None:
        self.steps: list[StepMetrics] = []
        self.epochs: list[tuple[int, dict | None]] = []
        self.stop_after = stop_after
        self.action = action

    def on_step(self, m: StepMetrics) -> None:
        self.steps.append(m)

    def on_epoch_end(self, epoch: int, valid_metrics: dict | None) -> None:
        self.epochs.append((epoch, valid_metrics))

    def should_stop(self) -> str | None:
        return self.action if self.stop_after is not None and len(self.steps) >= self.stop_after else None


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: build_tiny_chat_model(root / arch, arch=arch) for arch in ARCHITECTURES}


def make_config(model_dir: Path, output_dir: Path, **overrides: object) -> SFTConfig:
    config = SFTConfig(
        model_dir=model_dir,
        output_dir=output_dir,
        train_examples=EXAMPLES[:20],
        valid_examples=EXAMPLES[20:],
        n_epochs=4,
        batch_size=4,
        learning_rate=2e-2,
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=None,
        max_seq_length=64,
        seed=0,
    )
    return replace(config, **overrides)


def base_valid_loss(model_dir: Path) -> float:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = [tokenize_chat(tokenizer, messages, 64) for messages in EXAMPLES[20:]]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return evaluate_causal_lm(model, iter_batches(examples, 4, tokenizer.pad_token_id))["loss"]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_training_lowers_train_loss_and_valid_loss_below_base(
    model_dirs: dict[str, Path], tmp_path: Path, arch: str
) -> None:
    hooks = RecordingHooks()

    result = train_sft(make_config(model_dirs[arch], tmp_path), hooks)

    losses = [m.train_loss for m in hooks.steps]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.15
    final_valid = hooks.epochs[-1][1]
    assert final_valid is not None
    assert final_valid["loss"] < base_valid_loss(model_dirs[arch]) - 0.2
    assert result.metrics_rows[-1]["valid_loss"] == final_valid["loss"]
    assert result.stopped is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "tokenizer"]


def test_should_stop_ends_training_after_that_step_without_saving(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    hooks = RecordingHooks(stop_after=2)

    result = train_sft(make_config(model_dirs["llama"], tmp_path / "out"), hooks)

    assert result.stopped == "discard"
    assert result.steps_completed == 2
    assert [m.step for m in hooks.steps] == [1, 2]
    assert hooks.epochs == []
    assert not (tmp_path / "out").exists()


def test_a_stop_that_saves_keeps_the_adapter_trained_so_far(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    result = train_sft(
        make_config(model_dirs["llama"], tmp_path / "out"), RecordingHooks(stop_after=3, action="save")
    )
    assert result.stopped == "save"
    assert result.steps_completed == 3
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").exists()


def test_early_stopping_ends_training_when_validation_loss_stops_improving(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    # A learning rate this small barely moves the loss: with min_delta 1.0 no epoch counts as better.
    config = make_config(
        model_dirs["llama"], tmp_path / "out", n_epochs=5, early_stopping_patience=2,
        early_stopping_min_delta=1.0, learning_rate=1e-6,
    )  # fmt: skip
    hooks = RecordingHooks()
    result = train_sft(config, hooks)
    assert result.early_stopped
    assert [epoch for epoch, _ in hooks.epochs] == [1, 2, 3]
    assert (tmp_path / "out" / "adapter").exists()


@pytest.mark.parametrize("scheduler", ["linear", "cosine", "constant"])
def test_each_scheduler_warms_up_then_follows_its_shape(
    model_dirs: dict[str, Path], tmp_path: Path, scheduler: str
) -> None:
    config = make_config(
        model_dirs["llama"],
        tmp_path / "out",
        n_epochs=2,
        warmup_ratio=0.2,
        scheduler=scheduler,
        learning_rate=1e-3,
    )
    hooks = RecordingHooks()
    train_sft(config, hooks)
    rates = [m.learning_rate for m in hooks.steps]
    assert rates[0] < rates[2]  # warming up
    if scheduler == "constant":
        assert rates[-1] == pytest.approx(1e-3)
    else:
        assert rates[-1] < 0.2e-3  # decayed towards 0


def test_untrainable_example_fails_before_any_step(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    silent = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "weight": 0}]
    hooks = RecordingHooks()

    with pytest.raises(DataError, match=r"training example 3 \(line 4\) has no trainable tokens"):
        train_sft(make_config(model_dirs["llama"], tmp_path, train_examples=[*EXAMPLES[:3], silent]), hooks)

    assert hooks.steps == []


def test_saved_adapter_loads_and_changes_the_logits(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    train_sft(make_config(model_dirs["llama"], tmp_path, n_epochs=2), RecordingHooks())
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    prompt = tokenizer.apply_chat_template(qa(2, 2)[:1], add_generation_prompt=True, return_tensors="pt")

    base = AutoModelForCausalLM.from_pretrained(model_dirs["llama"])
    base_logits = base(**prompt).logits
    tuned = PeftModel.from_pretrained(base, tmp_path / "adapter")
    tuned_logits = tuned(**prompt).logits

    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert (tuned_logits - base_logits).abs().max() > 1e-2


def test_on_step_is_called_count_optimizer_steps_times(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    # 7 examples in batches of 2 → 4 batches per epoch → windows of 3 + 1 → 2 steps per epoch.
    config = make_config(
        model_dirs["llama"],
        tmp_path,
        train_examples=EXAMPLES[:7],
        batch_size=2,
        gradient_accumulation_steps=3,
        n_epochs=2,
    )
    hooks = RecordingHooks()

    result = train_sft(config, hooks)

    expected = count_optimizer_steps(7, micro_batch_size=2, gradient_accumulation_steps=3, n_epochs=2)
    assert expected == 4
    assert [m.step for m in hooks.steps] == [1, 2, 3, 4]
    assert [m.total_steps for m in hooks.steps] == [expected] * 4
    assert [m.epoch for m in hooks.steps] == [0.5, 1.0, 1.5, 2.0]
    assert result.steps_completed == result.total_steps == expected
    assert [row["valid_loss"] is not None for row in result.metrics_rows] == [False, True, False, True]
    assert result.trained_tokens == hooks.steps[-1].trained_tokens


def test_grad_accumulation_gives_the_gradient_of_the_full_batch(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """Two micro-batches of 1 must weight every token like one batch of 2, whatever their lengths."""
    examples = [qa(1, 2), LONG_REPLY]
    one_step = {"train_examples": examples, "valid_examples": None, "n_epochs": 1}
    accumulated, full = RecordingHooks(), RecordingHooks()
    # Batches of different shapes round differently: tight in fp32 (CPU), looser with bf16 weights (CUDA).
    rel = 2e-2 if torch.cuda.is_available() else 1e-5

    config = make_config(model_dirs["llama"], tmp_path / "a", **one_step)
    train_sft(replace(config, batch_size=1, gradient_accumulation_steps=2), accumulated)
    train_sft(replace(config, batch_size=2, gradient_accumulation_steps=1), full)

    tokenizer = AutoTokenizer.from_pretrained(model_dirs["llama"])
    trainable = [tokenize_chat(tokenizer, m, 64).n_trainable for m in examples]
    assert trainable[1] > 10 * trainable[0]  # a per-micro-batch mean would weight them very differently
    assert len(accumulated.steps) == len(full.steps) == 1
    assert accumulated.steps[0].train_loss == pytest.approx(full.steps[0].train_loss, rel=rel)
    assert accumulated.steps[0].grad_norm == pytest.approx(full.steps[0].grad_norm, rel=rel)
    assert accumulated.steps[0].grad_norm > 0


def test_validation_loss_is_per_token_whatever_the_batching(model_dirs: dict[str, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["llama"])
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"])
    examples = [tokenize_chat(tokenizer, m, 64) for m in [*EXAMPLES[:4], LONG_REPLY]]

    one_by_one = evaluate_causal_lm(model, iter_batches(examples, 1, tokenizer.pad_token_id))
    together = evaluate_causal_lm(model, iter_batches(examples, 5, tokenizer.pad_token_id))

    assert one_by_one["n_tokens"] == together["n_tokens"] == sum(e.n_trainable for e in examples)
    assert one_by_one["loss"] == pytest.approx(together["loss"], rel=1e-5)
    assert one_by_one["mean_token_accuracy"] == together["mean_token_accuracy"]
    assert together["perplexity"] == pytest.approx(math.exp(together["loss"]))
