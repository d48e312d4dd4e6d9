"""Run by tests/test_launch.py under `accelerate launch`: the SFT recipe on a tiny model, losses to JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from accelerate import PartialState

from services.trainer.sft import train_sft
from tests.test_sft import RecordingHooks, make_config

if __name__ == "__main__":
    model_dir, output_dir, losses_path, batch_size = sys.argv[1:5]
    hooks = RecordingHooks()
    config = make_config(Path(model_dir), Path(output_dir), n_epochs=2, batch_size=int(batch_size))
    result = train_sft(config, hooks)
    if PartialState().is_main_process:
        losses = {m.step: m.train_loss for m in hooks.steps}
        Path(losses_path).write_text(json.dumps({"losses": losses, "total_steps": result.total_steps}))
