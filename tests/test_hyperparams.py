"""The "auto" hyperparameter rules (shared/planning/hyperparams.py, a method's own in shared/methods/) and
how `resolve` applies them."""

from __future__ import annotations

import pytest

from shared.planning.estimate import DataStats, build_estimate
from shared.planning.gpu_classes import GpuClass
from shared.planning.hyperparams import (
    LORA_BASE_LEARNING_RATE,
    MAX_AUTO_EPOCHS,
    auto_batch_size,
    auto_epochs,
    auto_max_seq_length,
    resolve,
)
from shared.planning.model_facts import ModelFacts
from shared.platform.records import LoraSettings


@pytest.mark.parametrize(
    ("n_examples", "epochs"),
    [
        (10, 10),  # 10 × 3 < 100 → ceil(100 / 10)
        (20, 5),  # ceil(100 / 20)
        (33, 4),  # 99 < 100 → ceil(100 / 33)
        (34, 3),  # 102 is in range
        (100, 3),
        (8333, 3),  # 24 999 is in range
        (8334, 2),  # 25 002 > 25 000 → 25 000 // 8334
        (10_000, 2),
        (12_500, 2),
        (12_501, 1),
        (30_000, 1),  # 25 000 // 30 000 = 0, but at least one epoch
        (1_000_000, 1),
    ],
)
def test_auto_epochs_follow_openais_heuristic(n_examples: int, epochs: int) -> None:
    assert auto_epochs(n_examples)[0] == epochs


@pytest.mark.parametrize("n_examples", [1, 2, 3, 4])
def test_auto_epochs_never_exceed_25(n_examples: int) -> None:
    assert auto_epochs(n_examples)[0] == MAX_AUTO_EPOCHS == 25


def test_auto_epochs_give_their_reason() -> None:
    assert auto_epochs(20)[1] == "auto: 3 epochs adjusted so 20 examples × epochs lands in [100, 25000]"


@pytest.mark.parametrize(
    ("n_examples", "batch_size"),
    [
        (10, 1),  # 0.02 rounds to 0, but at least 1
        (500, 1),
        (1000, 2),
        (2000, 4),
        (4000, 8),
        (5000, 8),  # 10 is capped at 8
        (1_000_000, 8),
    ],
)
def test_auto_batch_size_is_about_0_2_percent_between_1_and_8(n_examples: int, batch_size: int) -> None:
    assert auto_batch_size(n_examples)[0] == batch_size


def test_auto_batch_size_gives_its_reason() -> None:
    assert auto_batch_size(1000)[1] == "auto: ~0.2% of 1000 examples, between 1 and 8"


def test_missing_and_auto_values_use_the_rules() -> None:
    for requested in ({}, {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}):
        resolved = resolve_for(requested, n_examples=1000)
        assert (resolved.n_epochs, resolved.batch_size, resolved.learning_rate_multiplier) == (3, 2, 1.0)
        assert resolved.reasons["n_epochs"] == auto_epochs(1000)[1]
        assert resolved.reasons["batch_size"] == auto_batch_size(1000)[1]
        assert resolved.reasons["learning_rate_multiplier"] == "auto: 1.0 × the base learning rate"


def test_none_counts_as_auto() -> None:
    resolved = resolve_for({"n_epochs": None, "batch_size": None}, n_examples=20)
    assert (resolved.n_epochs, resolved.batch_size) == (5, 1)


def test_explicit_values_are_kept_with_reason_set_by_the_request() -> None:
    resolved = resolve_for({"n_epochs": 7, "batch_size": 16, "learning_rate_multiplier": 0.5}, n_examples=20)
    assert (resolved.n_epochs, resolved.batch_size, resolved.learning_rate_multiplier) == (7, 16, 0.5)
    assert resolved.reasons["n_epochs"] == "set by the request"
    assert resolved.reasons["batch_size"] == "set by the request"
    assert resolved.reasons["learning_rate_multiplier"] == "set by the request"


def test_one_explicit_value_leaves_the_others_on_auto() -> None:
    resolved = resolve_for({"batch_size": 4}, n_examples=20)
    assert resolved.batch_size == 4
    assert resolved.reasons["batch_size"] == "set by the request"
    assert resolved.n_epochs == 5
    assert resolved.reasons["n_epochs"].startswith("auto: ")


def test_learning_rate_is_the_lora_base_rate_times_the_multiplier() -> None:
    resolved = resolve_for({"learning_rate_multiplier": 2}, n_examples=100)
    assert LORA_BASE_LEARNING_RATE == 2e-4
    assert resolved.learning_rate == pytest.approx(4e-4)
    assert resolved.learning_rate_multiplier == 2.0
    assert resolved.reasons["learning_rate"] == "0.0002 (the LoRA base rate) × multiplier 2"


def test_the_catalog_base_rate_is_used_when_given() -> None:
    resolved = resolve_for({"learning_rate_multiplier": 0.5}, n_examples=100, base_learning_rate=1e-2)
    assert resolved.learning_rate == pytest.approx(5e-3)
    assert resolved.reasons["learning_rate"] == "0.01 (the model's base rate in the catalog) × multiplier 0.5"


def test_auto_multiplier_uses_the_base_rate_unchanged() -> None:
    assert resolve_for({}, n_examples=100).learning_rate == pytest.approx(LORA_BASE_LEARNING_RATE)
    assert resolve_for({}, n_examples=100, base_learning_rate=3e-4).learning_rate == pytest.approx(3e-4)


# -- the data- and hardware-aware rules -------------------------------------------------------------

SMALL_MODEL = ModelFacts(
    n_params=1_000_000,
    hidden_size=64,
    num_layers=2,
    intermediate_size=128,
    vocab_size=259,
    max_position_embeddings=2048,
)
SEVEN_B = ModelFacts(
    n_params=7_000_000_000, hidden_size=4096, num_layers=32, intermediate_size=11008, vocab_size=32000,
    max_position_embeddings=4096,
)  # fmt: skip
A100 = GpuClass(name="a100", memory_gb=80, price_per_hour_usd=2.0, peak_tflops=312)
L4 = GpuClass(name="l4", memory_gb=24, price_per_hour_usd=0.8, peak_tflops=121)


def resolve_for(
    requested, n_examples, base_learning_rate=None, *, lengths=None, facts=SMALL_MODEL, gpu=A100, valid=1
):
    lengths = lengths or [100] * n_examples
    stats = DataStats(train_lengths=lengths, valid_lengths=[100] * valid, validation_source="held_out_split")
    return resolve(
        requested,
        stats,
        facts=facts,
        context=2048,
        base_learning_rate=base_learning_rate,
        lora=LoraSettings(),
        gpu_class=gpu,
    )


def test_auto_sequence_length_covers_99_percent_of_examples_in_multiples_of_64() -> None:
    lengths = [100] * 99 + [5000]
    assert auto_max_seq_length(lengths, 2048)[0] == 128
    assert auto_max_seq_length([3000] * 10, 2048)[0] == 2048


def test_a_batch_too_big_for_the_device_is_split_into_accumulation_steps() -> None:
    resolved = resolve_for(
        {"batch_size": 16, "max_seq_length": 4096}, 1000, facts=SEVEN_B, gpu=A100, lengths=[4096] * 1000
    )
    assert resolved.batch_size == 16
    assert resolved.micro_batch_size * resolved.gradient_accumulation_steps == 16
    assert resolved.gradient_accumulation_steps > 1
    assert "accumulation" in resolved.reasons["micro_batch_size"]


def test_the_whole_batch_runs_at_once_when_it_fits() -> None:
    resolved = resolve_for({"batch_size": 8}, 1000)
    assert (resolved.micro_batch_size, resolved.gradient_accumulation_steps) == (8, 1)


def test_early_stopping_is_suggested_only_with_validation_data_and_epochs_to_stop_in() -> None:
    assert resolve_for({"n_epochs": 3}, 1000).early_stopping_patience == 2
    assert resolve_for({"n_epochs": 2}, 1000).early_stopping_patience is None
    assert resolve_for({"n_epochs": 3}, 1000, valid=0).early_stopping_patience is None


def test_every_setting_has_a_reason() -> None:
    resolved = resolve_for({}, 1000)
    expected = {
        "n_epochs", "batch_size", "learning_rate_multiplier", "learning_rate", "max_seq_length", "micro_batch_size",
        "method", "warmup_ratio", "weight_decay", "scheduler", "max_grad_norm", "early_stopping_patience",
        "early_stopping_min_delta", "packing", "lora", "label_smoothing",
    }  # fmt: skip
    assert expected <= set(resolved.reasons)


def test_the_estimate_counts_tokens_and_steps_exactly() -> None:
    lengths = [50, 70, 300, 90, 10]
    stats = DataStats(train_lengths=lengths, valid_lengths=[40], validation_source="validation_file")
    resolved = resolve({"n_epochs": 2, "batch_size": 2, "max_seq_length": 128}, stats, facts=SMALL_MODEL,
                       context=2048, base_learning_rate=None, lora=LoraSettings(), gpu_class=A100)  # fmt: skip
    estimate = build_estimate(stats, SMALL_MODEL, resolved, lora_r=8, seed=0, classes={"a100": A100, "l4": L4},
                              calibration={})  # fmt: skip
    assert estimate["trained_tokens"] == 2 * (50 + 70 + 128 + 90 + 10)
    assert estimate["optimizer_steps"] == 2 * 3
    assert estimate["train_tokens"]["truncated_examples"] == 1
    assert set(estimate["gpu_classes"]) == {"a100", "l4"}
    assert estimate["gpu_classes"]["l4"]["cost_usd"] > 0


def test_a_calibrated_class_uses_its_measured_speed() -> None:
    stats = DataStats(train_lengths=[100] * 10, valid_lengths=[], validation_source="validation_file")
    resolved = resolve_for({}, 10)
    slow = build_estimate(
        stats, SMALL_MODEL, resolved, lora_r=8, seed=0, classes={"a100": A100}, calibration={"a100": 1e9}
    )
    fast = build_estimate(
        stats, SMALL_MODEL, resolved, lora_r=8, seed=0, classes={"a100": A100}, calibration={"a100": 1e12}
    )
    assert slow["gpu_classes"]["a100"]["duration_seconds"] == pytest.approx(
        fast["gpu_classes"]["a100"]["duration_seconds"] * 1000, rel=1e-6
    )
    assert slow["gpu_classes"]["a100"]["speed"] == "measured on earlier jobs of this class"


def test_packing_is_chosen_when_it_saves_a_quarter_of_the_compute() -> None:
    from shared.methods.supervised import auto_packing

    mixed = [20, 500, 30, 480, 25, 510, 40, 490] * 20  # long and short rows padded together
    assert auto_packing(mixed, 512, 8, seed=0)[0] is True
    assert "fewer tokens per epoch" in auto_packing(mixed, 512, 8, seed=0)[1]
    assert auto_packing([100] * 100, 512, 1, seed=0)[0] is False  # one example a batch: nothing to save


def test_a_packed_estimate_counts_packed_rows() -> None:
    from shared.planning.packing import packed_row_count

    lengths = [100, 200, 300, 50, 60, 500, 10, 20, 30, 40]
    stats = DataStats(train_lengths=lengths, valid_lengths=[40], validation_source="validation_file")
    resolved = resolve(
        {"n_epochs": 2, "batch_size": 2, "max_seq_length": 512, "packing": True}, stats, facts=SMALL_MODEL,
        context=2048, base_learning_rate=None, lora=LoraSettings(), gpu_class=A100,
    )  # fmt: skip
    estimate = build_estimate(
        stats, SMALL_MODEL, resolved, lora_r=8, seed=0, classes={"a100": A100}, calibration={}
    )
    assert resolved.packing is True
    assert estimate["optimizer_steps"] == 2 * -(-packed_row_count(lengths, 512) // 2)
    assert estimate["trained_tokens"] == 2 * sum(lengths)
