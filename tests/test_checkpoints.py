"""Full-state checkpoints of the SFT recipe: a run suspended and resumed from its checkpoint trains the
same steps with the same losses as a run never interrupted."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from services.trainer.checkpointing import LOOP_STATE, MODEL_WEIGHTS, LoopState
from services.trainer.recipes.sft import train_sft
from shared.ml.builtin_models import build_tiny_chat_model
from tests.test_sft import RecordingHooks, make_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("models") / "llama", arch="llama")


class FolderSink:
    """Checkpoints copied to a folder, every `every` steps."""

    def __init__(self, root: Path, every: int | None = None) -> None:
        self.root = root
        self.every = every
        self.saved_steps: list[int] = []

    def due(self, step: int) -> bool:
        return self.every is not None and step % self.every == 0

    def upload(self, step: int, directory: Path) -> None:
        shutil.copytree(directory, self.root / directory.name)

    def saved(self, step: int, directory: Path, state: LoopState) -> None:
        self.saved_steps.append(step)

    def path(self, step: int) -> Path:
        return self.root / f"step-{step:08d}"


def losses(hooks: RecordingHooks) -> dict[int, float]:
    return {m.step: m.train_loss for m in hooks.steps}


@pytest.mark.parametrize(
    "options",
    [
        {"lora_dropout": 0.1},  # dropout draws from the RNG a checkpoint restores
        {"gradient_accumulation_steps": 2, "batch_size": 2},
        {"packing": True, "max_seq_length": 48},
    ],
    ids=["dropout", "accumulation", "packing"],
)
def test_a_resumed_run_repeats_the_uninterrupted_losses(
    model_dir: Path, tmp_path: Path, options: dict
) -> None:
    config = make_config(model_dir, tmp_path / "full", n_epochs=3, **options)
    whole = RecordingHooks()
    full = train_sft(config, whole)

    sink = FolderSink(tmp_path / "ckpts")
    first = RecordingHooks(stop_after=7, action="suspend")
    suspended = train_sft(replace(config, output_dir=tmp_path / "a", checkpoints=sink), first)
    assert suspended.stopped == "suspend" and sink.saved_steps == [7]
    assert not (tmp_path / "a" / "adapter").exists()  # suspended: the checkpoint is the state

    second = RecordingHooks()
    resumed = train_sft(
        replace(config, output_dir=tmp_path / "b", checkpoints=sink, resume_from=sink.path(7)), second
    )
    assert [m.step for m in second.steps] == list(range(8, full.total_steps + 1))
    assert resumed.steps_completed == full.steps_completed
    expected = losses(whole)
    for step, loss in losses(second).items():
        assert loss == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    assert [r["step"] for r in resumed.metrics_rows] == [r["step"] for r in full.metrics_rows]
    a = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_periodic_checkpoints_hold_the_adapter_optimizer_and_loop_state_only(
    model_dir: Path, tmp_path: Path
) -> None:
    sink = FolderSink(tmp_path / "ckpts", every=4)
    result = train_sft(
        make_config(model_dir, tmp_path / "out", n_epochs=2, checkpoints=sink), RecordingHooks()
    )
    assert sink.saved_steps == [s for s in range(1, result.total_steps + 1) if s % 4 == 0]
    folder = sink.path(4)
    weights = load_file(folder / MODEL_WEIGHTS)
    assert weights and all("lora_" in name for name in weights)  # the frozen base is not copied
    assert (folder / "optimizer.bin").exists() and (folder / "custom_checkpoint_0.pkl").exists()
    state = LoopState(**json.loads((folder / LOOP_STATE).read_text()))
    assert state.step == 4 and len(state.rows) == 4


def test_a_checkpoint_of_another_adapter_shape_is_refused(model_dir: Path, tmp_path: Path) -> None:
    sink = FolderSink(tmp_path / "ckpts", every=2)
    config = make_config(model_dir, tmp_path / "out", n_epochs=1, checkpoints=sink)
    train_sft(config, RecordingHooks())
    other = replace(
        config, output_dir=tmp_path / "other", target_modules=["q_proj"], resume_from=sink.path(2)
    )
    with pytest.raises(ValueError, match="another model or adapter configuration"):
        train_sft(other, RecordingHooks())
