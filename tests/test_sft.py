"""The supervised LoRA recipe on a tiny model: it learns, stops on request, saves a usable adapter."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.trainer.driver import StepMetrics
from services.trainer.recipes import sft
from services.trainer.recipes.sft import SFTConfig, train_sft
from shared.data.formats import Example
from shared.ml import token_cache
from shared.ml.builtin_models import ARCHITECTURES, build_tiny_chat_model
from shared.ml.chat_data import DataError, iter_batches, tokenize_chat
from shared.ml.lm_metrics import evaluate_causal_lm
from shared.planning.estimate import count_optimizer_steps
from shared.planning.packing import packed_row_count
from shared.platform.storage import LocalStorage


def qa(a: int, b: int) -> list[dict]:
    return [
        {"role": "user", "content": f"What is {a}+{b}?"},
        {"role": "assistant", "content": f"{a + b}"},
    ]


EXAMPLES = [qa(a, b) for a in range(1, 6) for b in range(1, 6)]  # 25: 20 to train, 5 to validate


def chat(conversations: list[list[dict]], sources: list[str] | None = None) -> list[Example]:
    """Conversations as a job's file gives them to the recipe: chat Examples, each named by its place."""
    return [
        Example(kind="chat", source=sources[i] if sources else f"line {i + 1}", messages=messages)
        for i, messages in enumerate(conversations)
    ]


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
        train_examples=chat(EXAMPLES[:20]),
        valid_examples=chat(EXAMPLES[20:]),
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
        train_sft(
            make_config(model_dirs["llama"], tmp_path, train_examples=chat([*EXAMPLES[:3], silent])), hooks
        )

    assert hooks.steps == []


def test_examples_truncation_leaves_nothing_to_learn_are_skipped_and_named(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    cut = [
        {"role": "user", "content": "Tell me " * 20},
        {"role": "assistant", "content": "No."},
    ]  # > 64 tokens
    config = make_config(
        model_dirs["llama"], tmp_path, train_examples=chat([*EXAMPLES[:8], cut], [f"item {i}" for i in range(1, 10)]),
        valid_examples=chat([cut, *EXAMPLES[20:]], [f"item {i}" for i in range(10, 16)]),
        n_epochs=1,
    )  # fmt: skip
    hooks = RecordingHooks()

    result = train_sft(config, hooks)

    assert result.warnings[:2] == [
        "Skipped 1 of 9 training examples (item 9): at the maximum sequence length (64 tokens), truncation "
        "cuts off every trained token of their assistant replies; they are not trained on",
        "Skipped 1 of 6 validation examples (item 10): at the maximum sequence length (64 tokens), truncation "
        "cuts off every trained token of their assistant replies; they are not trained on",
    ]
    # The 8 examples left: 2 steps of 4.
    assert result.total_steps == len(hooks.steps) == 2


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
        train_examples=chat(EXAMPLES[:7]),
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
    one_step = {"train_examples": chat(examples), "valid_examples": None, "n_epochs": 1}
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


def test_packed_training_counts_packed_rows_and_still_validates(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    # 20 examples of 34-35 tokens in rows of 128: 3 per row → 7 rows, in batches of 2 rows, windows of 2
    # batches → 2 steps per epoch (unpacked: 10 batches of 2 examples → 5 steps).
    config = make_config(
        model_dirs["llama"], tmp_path, packing=True, n_epochs=2, batch_size=2, gradient_accumulation_steps=2,
        max_seq_length=128,
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["llama"])
    lengths = [len(tokenize_chat(tokenizer, m, 128).input_ids) for m in EXAMPLES[:20]]
    rows = packed_row_count(lengths, 128)
    assert rows == 7
    hooks = RecordingHooks()

    result = train_sft(config, hooks)

    expected = count_optimizer_steps(rows, 2, 2, 2)
    assert (expected, count_optimizer_steps(len(lengths), 2, 2, 2)) == (4, 10)
    assert [m.step for m in hooks.steps] == list(range(1, expected + 1))
    assert result.total_steps == result.steps_completed == expected
    assert result.packing is not None and result.packing.rows == rows
    assert result.trained_tokens == 2 * sum(lengths)  # every real token, no padding, each epoch
    assert [epoch for epoch, metrics in hooks.epochs if metrics is not None] == [1, 2]  # unpacked evaluation


def test_a_packed_step_trains_like_the_unpacked_batch(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """The same two examples, once as a padded batch of 2 and once packed into one row of 128 tokens (and
    trained on their inputs too, so the second example's first token has a label that packing must drop):
    one optimizer step each, with the same loss and gradient."""
    examples = [qa(1, 2), LONG_REPLY]
    config = make_config(
        model_dirs["llama"], tmp_path, train_examples=chat(examples), valid_examples=None, n_epochs=1,
        max_seq_length=128, train_on_inputs=True,
    )  # fmt: skip
    unpacked, packed = RecordingHooks(), RecordingHooks()

    train_sft(replace(config, batch_size=2), unpacked)
    result = train_sft(replace(config, batch_size=1, packing=True), packed)

    assert result.packing is not None and result.packing.rows == 1
    assert len(unpacked.steps) == len(packed.steps) == 1
    # Measured: equal to ~1e-7 relative (fp32, CPU); the batches differ only in padding.
    rel = 2e-2 if torch.cuda.is_available() else 1e-5
    assert packed.steps[0].train_loss == pytest.approx(unpacked.steps[0].train_loss, rel=rel)
    assert packed.steps[0].train_accuracy == unpacked.steps[0].train_accuracy
    assert packed.steps[0].grad_norm == pytest.approx(unpacked.steps[0].grad_norm, rel=rel)
    assert packed.steps[0].trained_tokens == unpacked.steps[0].trained_tokens


def test_packing_falls_back_to_padding_for_an_attention_that_cannot_isolate_examples(
    model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sft, "packing_mode", lambda implementation: None)  # as for flex_attention
    config = make_config(
        model_dirs["llama"], tmp_path, train_examples=chat(EXAMPLES[:6]), valid_examples=None, n_epochs=1,
        packing=True,
    )  # fmt: skip

    result = train_sft(config, RecordingHooks())

    assert result.packing is None
    assert result.total_steps == count_optimizer_steps(6, 4, 1, 1)
    assert any("packing is not supported with the 'sdpa' attention" in w for w in result.warnings)


def test_a_second_run_on_the_same_data_reuses_the_tokenized_cache(
    model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = LocalStorage(tmp_path / "storage")
    config = make_config(
        model_dirs["llama"], tmp_path / "out", train_examples=chat(EXAMPLES[:8]), n_epochs=1, max_steps=1,
        token_cache=storage, token_cache_prefix="tenants/org-1/cache/tokenized/", train_on_inputs=True,
    )  # fmt: skip
    first = train_sft(config, RecordingHooks())
    entries = storage.list_keys("tenants/org-1/cache/tokenized/")
    assert len(entries) == 2  # the training and the validation examples

    def no_tokenizing(*args: object, **kwargs: object) -> None:
        raise AssertionError("tokenized again")

    monkeypatch.setattr(sft, "tokenize_dataset", no_tokenizing)
    monkeypatch.setattr(token_cache, "tokenize_all", no_tokenizing)
    second = train_sft(config, RecordingHooks())

    assert second.metrics_rows == first.metrics_rows
    assert second.trial_valid == first.trial_valid
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["llama"])
    key = token_cache.cache_key(
        token_cache.data_sha256(EXAMPLES[:8]), tokenizer, 64, True, eos_token_ids={tokenizer.eos_token_id}
    )
    cached = token_cache.load(storage, key, prefix="tenants/org-1/cache/tokenized/")
    assert cached is not None and all(e.labels == e.input_ids for e in cached)  # train_on_inputs
    # Validation stays on the replies alone, as the evaluator measures it.
    valid_key = token_cache.cache_key(
        token_cache.data_sha256(EXAMPLES[20:]), tokenizer, 64, False, eos_token_ids={tokenizer.eos_token_id}
    )
    assert sorted(entries) == sorted(
        f"tenants/org-1/cache/tokenized/{k}.safetensors" for k in (key, valid_key)
    )


def test_a_tiny_model_trains_on_one_thread_and_the_process_setting_is_restored_after(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    threads: list[int] = []

    class ThreadHooks(RecordingHooks):
        def on_step(self, m: StepMetrics) -> None:
            threads.append(torch.get_num_threads())

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        train_sft(make_config(model_dirs["llama"], tmp_path, n_epochs=1), ThreadHooks())
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)

    assert set(threads) == {1}
    assert after == 2
