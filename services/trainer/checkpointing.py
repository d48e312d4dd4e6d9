"""Full training-state checkpoints: what the driver's loop saves so another worker can carry on from it.

A checkpoint is accelerate's own `save_state` (model or adapter weights, optimizer, scheduler, every
process's RNG states; FSDP and DeepSpeed shard theirs) plus `loop_state.json`: the step, the epoch and
how many of its batches were consumed, the metrics so far, early-stopping state. For a LoRA model only the
trainable weights are written: the frozen base comes back from the catalog, so a 7B job's checkpoint is
megabytes, not gigabytes.

The loop saves one when the job's sink says one is due (every N steps or seconds) and when training must
stop but carry on later (preemption, pause). Every process takes part in a save; the local main process of
each node uploads what its node wrote; the main process then registers the checkpoint (`sink.saved`), so a
checkpoint is listed only once all of its files are stored.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from safetensors.torch import load_file

log = logging.getLogger(__name__)

LOOP_STATE = "loop_state.json"
MODEL_WEIGHTS = "model.safetensors"  # accelerate's name for the first model's weights (then model_1...)


class CheckpointSink(Protocol):
    """Where a job's checkpoints go (the trainer task implements it with storage and the job store)."""

    def due(self, step: int) -> bool:
        """Asked on the main process after every optimizer step: is a periodic checkpoint due?"""

    def upload(self, step: int, directory: Path) -> None:
        """Called on each node's local main process once every process has written `directory`."""

    def saved(self, step: int, directory: Path, state: LoopState) -> None:
        """Called on the main process once every node has uploaded: the checkpoint may be listed."""


@dataclass
class LoopState:
    """Where the driver's loop stands after an optimizer step: enough to continue it exactly."""

    step: int = 0
    epoch: int = 1  # the epoch in progress (1-based)
    batches_in_epoch: int = 0  # micro-batches of that epoch already consumed, per process
    trained_tokens: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)  # the recipe's per-step metrics rows
    best_valid_loss: float | None = None  # early stopping
    bad_epochs: int = 0


class Checkpoints:
    """The loop's side of checkpointing: deciding together when to save, saving, and resuming."""

    def __init__(self, accelerator: Accelerator, sink: CheckpointSink | None, workdir: Path) -> None:
        self.accelerator = accelerator
        self.sink = sink
        self.workdir = workdir
        self.trainable: set[str] | None = None

    def save_trainable_only(self, prepared_model: torch.nn.Module) -> None:
        """Write and read only the weights that train (a LoRA adapter, a head): the base is frozen."""
        # Named as in the unwrapped model: a DDP wrapper adds "module." to its own names, not to the state
        # dict accelerate hands the hook.
        model = self.accelerator.unwrap_model(prepared_model)
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        if len(trainable) == sum(1 for _ in model.parameters()):
            return  # full fine-tuning: every weight is state
        self.trainable = trainable
        self.accelerator.register_save_state_pre_hook(self._keep_trainable)
        self.accelerator.register_load_state_pre_hook(self._load_trainable)

    def due(self, step: int, suspend: bool) -> bool:
        """Agreed by all processes: save now? Always when stopping to carry on later (`suspend`)."""
        if self.sink is None:
            return False
        wanted = suspend or (self.accelerator.is_main_process and self.sink.due(step))
        flag = torch.tensor(float(wanted), device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="max").item())

    def save(self, state: LoopState) -> None:
        """Every process writes its part; each node uploads its files; the main process registers it."""
        assert self.sink is not None
        directory = self.workdir / f"step-{state.step:08d}"
        self.accelerator.save_state(str(directory), safe_serialization=True)
        if self.accelerator.is_main_process:
            (directory / LOOP_STATE).write_text(json.dumps(asdict(state)))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_local_main_process:
            self.sink.upload(state.step, directory)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self.sink.saved(state.step, directory, state)
        log.info("checkpoint saved at step %d", state.step)

    def resume(self, directory: Path) -> LoopState:
        """Restore a checkpoint written by `save` into the prepared objects; its loop state."""
        self.accelerator.load_state(str(directory))
        state = LoopState(**json.loads((directory / LOOP_STATE).read_text()))
        log.info(
            "resumed from step %d (epoch %d, %d batches in)", state.step, state.epoch, state.batches_in_epoch
        )
        return state

    def _keep_trainable(self, models: list, weights: list, output_dir: str) -> None:
        assert self.trainable is not None
        for i, state_dict in enumerate(weights):
            kept = {_unwrapped(name): tensor for name, tensor in state_dict.items()}
            weights[i] = {name: tensor for name, tensor in kept.items() if name in self.trainable}

    def _load_trainable(self, models: list, input_dir: str) -> None:
        assert self.trainable is not None
        for i, model in enumerate(models):
            name = MODEL_WEIGHTS if i == 0 else MODEL_WEIGHTS.replace(".", f"_{i}.")
            device = self.accelerator.device  # safetensors knows "cpu", not gloo's "cpu:0"
            saved = load_file(
                str(Path(input_dir) / name), device="cpu" if device.type == "cpu" else str(device)
            )
            if set(saved) != self.trainable:
                raise ValueError(
                    f"checkpoint in {input_dir} holds {len(saved)} trainable tensors, the model has "
                    f"{len(self.trainable)}: it was saved for another model or adapter configuration"
                )
            loaded = self.accelerator.unwrap_model(model).load_state_dict(saved, strict=False)
            assert not loaded.unexpected_keys, loaded.unexpected_keys
        models.clear()  # loaded here: accelerate must not load them again (strictly, as a full model)


def _unwrapped(name: str) -> str:
    return name.removeprefix("module.")
