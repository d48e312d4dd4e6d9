"""The "auto" hyperparameter rules (shared/hyperparams.py) and how `resolve` applies them."""

from __future__ import annotations

import pytest

from shared.hyperparams import (
    LORA_BASE_LEARNING_RATE,
    MAX_AUTO_EPOCHS,
    auto_batch_size,
    auto_epochs,
    resolve,
)


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
        resolved = resolve(requested, n_examples=1000)
        assert (resolved.n_epochs, resolved.batch_size, resolved.learning_rate_multiplier) == (3, 2, 1.0)
        assert resolved.reasons["n_epochs"] == auto_epochs(1000)[1]
        assert resolved.reasons["batch_size"] == auto_batch_size(1000)[1]
        assert resolved.reasons["learning_rate_multiplier"] == "auto: 1.0 × the base learning rate"


def test_none_counts_as_auto() -> None:
    resolved = resolve({"n_epochs": None, "batch_size": None}, n_examples=20)
    assert (resolved.n_epochs, resolved.batch_size) == (5, 1)


def test_explicit_values_are_kept_with_reason_set_by_the_request() -> None:
    resolved = resolve({"n_epochs": 7, "batch_size": 16, "learning_rate_multiplier": 0.5}, n_examples=20)
    assert (resolved.n_epochs, resolved.batch_size, resolved.learning_rate_multiplier) == (7, 16, 0.5)
    assert resolved.reasons["n_epochs"] == "set by the request"
    assert resolved.reasons["batch_size"] == "set by the request"
    assert resolved.reasons["learning_rate_multiplier"] == "set by the request"


def test_one_explicit_value_leaves_the_others_on_auto() -> None:
    resolved = resolve({"batch_size": 4}, n_examples=20)
    assert resolved.batch_size == 4
    assert resolved.reasons["batch_size"] == "set by the request"
    assert resolved.n_epochs == 5
    assert resolved.reasons["n_epochs"].startswith("auto: ")


def test_learning_rate_is_the_lora_base_rate_times_the_multiplier() -> None:
    resolved = resolve({"learning_rate_multiplier": 2}, n_examples=100)
    assert LORA_BASE_LEARNING_RATE == 2e-4
    assert resolved.learning_rate == pytest.approx(4e-4)
    assert resolved.learning_rate_multiplier == 2.0
    assert resolved.reasons["learning_rate"] == "0.0002 (the LoRA base rate) × multiplier 2"


def test_the_catalog_base_rate_is_used_when_given() -> None:
    resolved = resolve({"learning_rate_multiplier": 0.5}, n_examples=100, base_learning_rate=1e-2)
    assert resolved.learning_rate == pytest.approx(5e-3)
    assert resolved.reasons["learning_rate"] == "0.01 (the model's base rate in the catalog) × multiplier 0.5"


def test_auto_multiplier_uses_the_base_rate_unchanged() -> None:
    assert resolve({}, n_examples=100).learning_rate == pytest.approx(LORA_BASE_LEARNING_RATE)
    assert resolve({}, n_examples=100, base_learning_rate=3e-4).learning_rate == pytest.approx(3e-4)
