"""Run by tests/test_launch.py under `accelerate launch`: the SFT recipe on a tiny model, losses to JSON.

Arguments: model_dir output_dir losses_path batch_size [checkpoints_dir stop resume_from]: with a
checkpoints folder, the run saves its checkpoints there, is stopped as `stop` says ("<step>:<action>",
e.g. "4:suspend" or "4:discard"; "0": never) and resumes from `resume_from` ("-": from the start).
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

from accelerate import PartialState

from services.trainer.recipes.sft import train_sft
from tests.test_checkpoints import FolderSink
from tests.test_sft import RecordingHooks, make_config

if __name__ == "__main__":
    model_dir, output_dir, losses_path, batch_size = sys.argv[1:5]
    config = make_config(Path(model_dir), Path(output_dir), n_epochs=2, batch_size=int(batch_size))
    hooks = RecordingHooks()
    if len(sys.argv) > 5:
        checkpoints, stop, resume_from = sys.argv[5:8]
        stop_after, _, action = stop.partition(":")
        config = replace(
            config,
            checkpoints=FolderSink(Path(checkpoints)),
            resume_from=None if resume_from == "-" else Path(resume_from),
        )
        hooks = RecordingHooks(stop_after=int(stop_after) or None, action=action)
    result = train_sft(config, hooks)
    if PartialState().is_main_process:
        losses = {m.step: m.train_loss for m in hooks.steps}
        Path(losses_path).write_text(
            json.dumps({"losses": losses, "total_steps": result.total_steps, "stopped": result.stopped})
        )
