"""Full-state checkpoints of the classification and DPO recipes, as of the SFT recipe (tests/test_checkpoints.py):
a run suspended at a step and resumed from its checkpoint trains the remaining steps with the same losses,
and saves the same weights, as a run never interrupted."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from services.trainer.recipes.classification import train_classification
from services.trainer.recipes.dpo import train_dpo
from shared.ml.builtin_models import build_tiny_chat_model
from tests.test_checkpoints import FolderSink
from tests.test_classification import RecordingHooks, llama_config
from tests.test_dpo import make_config as dpo_config

STOP_AT = 5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("models") / "llama", arch="llama")


def losses(hooks: RecordingHooks) -> dict[int, float]:
    return {m.step: m.train_loss for m in hooks.steps}


def interrupted_and_whole(
    train: Callable[[Any, RecordingHooks], Any], config: Any, tmp_path: Path
) -> tuple[Any, RecordingHooks, Any, RecordingHooks]:
    """The uninterrupted run, and a run suspended after STOP_AT steps then resumed from its checkpoint."""
    whole = RecordingHooks()
    full = train(replace(config, output_dir=tmp_path / "full"), whole)

    sink = FolderSink(tmp_path / "ckpts")
    suspended = train(
        replace(config, output_dir=tmp_path / "a", checkpoints=sink), RecordingHooks(STOP_AT, "suspend")
    )
    assert suspended.stopped == "suspend" and sink.saved_steps == [STOP_AT]
    # Suspended: the checkpoint is the state; no model is saved.
    assert not any((tmp_path / "a" / name).exists() for name in ("adapter", "model"))

    second = RecordingHooks()
    resumed = train(
        replace(config, output_dir=tmp_path / "b", checkpoints=sink, resume_from=sink.path(STOP_AT)), second
    )
    return full, whole, resumed, second


def assert_same_run(full: Any, whole: RecordingHooks, resumed: Any, second: RecordingHooks) -> None:
    assert [m.step for m in second.steps] == list(range(STOP_AT + 1, full.total_steps + 1))
    assert resumed.steps_completed == full.steps_completed == full.total_steps
    expected = losses(whole)
    for step, loss in losses(second).items():
        assert loss == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    # The metrics rows (with the validation figures at epoch ends) continue as one run's.
    assert len(resumed.metrics_rows) == len(full.metrics_rows)
    for got, want in zip(resumed.metrics_rows, full.metrics_rows, strict=True):
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == (value if value is None else pytest.approx(value, rel=1e-5, abs=1e-6)), key


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = load_file(a), load_file(b)
    assert first.keys() == second.keys()
    assert all(torch.allclose(first[k], second[k], atol=1e-6) for k in first)


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("lora", {"lora_dropout": 0.1}),  # dropout draws from the RNG a checkpoint restores
        ("full", {"gradient_accumulation_steps": 2, "batch_size": 4, "class_weights": "balanced"}),
    ],
    ids=["lora-dropout", "full-accumulation"],
)
def test_a_resumed_classification_run_repeats_the_uninterrupted_losses(
    model_dir: Path, tmp_path: Path, method: str, options: dict[str, Any]
) -> None:
    config = llama_config(
        model_dir, tmp_path, method=method, n_epochs=2, torch_threads=1, **options
    )  # 64 rows / 8 per step: 16 steps, the stop in the first epoch

    full, whole, resumed, second = interrupted_and_whole(train_classification, config, tmp_path)

    assert_same_run(full, whole, resumed, second)
    weights = "adapter/adapter_model.safetensors" if method == "lora" else "model/model.safetensors"
    assert_same_weights(tmp_path / "full" / weights, tmp_path / "b" / weights)
    assert (tmp_path / "b" / "labels.json").read_text() == (tmp_path / "full" / "labels.json").read_text()


def test_a_resumed_dpo_run_repeats_the_uninterrupted_losses(model_dir: Path, tmp_path: Path) -> None:
    # 12 pairs, batches of 2: 6 steps an epoch, 12 in all; the stop falls in the first epoch, the
    # resumed run crosses an epoch end (validation) and a new epoch's shuffled order.
    config = dpo_config(model_dir, tmp_path, batch_size=2, lora_dropout=0.1)

    full, whole, resumed, second = interrupted_and_whole(train_dpo, config, tmp_path)

    assert_same_run(full, whole, resumed, second)
    weights = "adapter/adapter_model.safetensors"
    assert_same_weights(tmp_path / "full" / weights, tmp_path / "b" / weights)
