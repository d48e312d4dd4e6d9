"""A job's full-state checkpoints in storage and in the job store: saving, listing, pruning, resuming.

Each checkpoint is uploaded under `checkpoints/attempt-<a>-step-<n>/` and then recorded, fenced by the
attempt, as the job's `resume_checkpoint`: an attempt that was declared dead cannot make the job resume
from its files. It is also listed among the job's checkpoints (OpenAI's checkpoint object, with Tunery's
`resumable` and `state_prefix`); only the newest `TUNERY_CHECKPOINT_KEEP` are kept.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.trainer.checkpointing import LoopState
from shared.platform import storage_keys
from shared.platform.ids import new_id
from shared.platform.job_store import JobStore
from shared.platform.records import JobRecord, ResumeCheckpoint, fine_tuned_model_id, now
from shared.platform.settings import Settings
from shared.platform.storage import Storage

log = logging.getLogger(__name__)


class JobCheckpoints:
    """The trainer task's `CheckpointSink`: when a checkpoint is due, and where it goes."""

    def __init__(
        self,
        settings: Settings,
        storage: Storage,
        jobs: JobStore,
        record: JobRecord,
        send_rows: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        # Sends the step metrics not yet in the job's series (ProgressHooks batches them): a checkpoint is
        # listed only once its steps' metrics are stored, so that a run resumed from it has them all.
        self.send_rows = send_rows
        self.storage = storage
        self.jobs = jobs
        self.record = record
        every_steps = record.checkpoint_every_steps
        every_seconds = record.checkpoint_every_seconds
        self.every_steps = settings.checkpoint_every_steps if every_steps is None else every_steps
        self.every_seconds = settings.checkpoint_every_seconds if every_seconds is None else every_seconds
        self.last_saved = time.monotonic()

    def due(self, step: int) -> bool:
        by_steps = self.every_steps > 0 and step % self.every_steps == 0
        by_time = self.every_seconds > 0 and time.monotonic() - self.last_saved >= self.every_seconds
        return by_steps or by_time

    def prefix(self, step: int) -> str:
        return storage_keys.checkpoint_prefix(self.record.tenant, self.record.id, self.record.attempt, step)

    def upload(self, step: int, directory: Path) -> None:
        self.storage.upload_directory(directory, self.prefix(step))

    def saved(self, step: int, directory: Path, state: LoopState) -> None:
        self.send_rows()
        self.last_saved = time.monotonic()
        checkpoint = ResumeCheckpoint(
            id=new_id("ftckpt"), step=step, attempt=self.record.attempt, prefix=self.prefix(step),
            trained_tokens=state.trained_tokens, created_at=now(),
        )  # fmt: skip

        def point_at(record: JobRecord) -> None:
            record.resume_checkpoint = checkpoint

        self.jobs.update(self.record.id, point_at, expected_attempt=self.record.attempt)
        self.jobs.add_checkpoint(
            self.record.id, self._listing(checkpoint, state.rows[-1] if state.rows else {})
        )
        self.jobs.add_event(
            self.record.id, f"Checkpoint saved at step {step} (full training state)",
            data={"step": step, "checkpoint": checkpoint.id},
        )  # fmt: skip
        self._prune(keep_id=checkpoint.id)

    def _listing(self, checkpoint: ResumeCheckpoint, row: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": checkpoint.id,
            "object": "fine_tuning.job.checkpoint",
            "created_at": checkpoint.created_at,
            "fine_tuned_model_checkpoint": f"{fine_tuned_model_id(self.record)}:ckpt-step-{checkpoint.step}",
            "fine_tuning_job_id": self.record.id,
            "step_number": checkpoint.step,
            "metrics": {
                "step": float(checkpoint.step),
                "train_loss": row.get("train_loss"),
                "train_mean_token_accuracy": row.get("train_accuracy"),
                "valid_loss": row.get("valid_loss"),
                "valid_mean_token_accuracy": row.get("valid_mean_token_accuracy"),
            },
            # Tunery extras: a full training state a later attempt can carry on from, and where it is.
            "resumable": True,
            "attempt": checkpoint.attempt,
            "state_prefix": checkpoint.prefix,
        }

    def _prune(self, keep_id: str) -> None:
        """Delete the oldest resumable checkpoints beyond the configured number (never `keep_id`)."""
        listed, _ = self.jobs.list_checkpoints(self.record.id, after=None, limit=10_000)
        resumable = [c for c in listed if c.get("resumable") and c["id"] != keep_id]  # newest first
        for old in resumable[self.settings.checkpoint_keep - 1 :]:
            self.storage.delete_prefix(old["state_prefix"])
            self.jobs.remove_checkpoint(self.record.id, old["id"])
            log.info("pruned checkpoint %s of %s (step %s)", old["id"], self.record.id, old["step_number"])


def fetch_resume_checkpoint(storage: Storage, record: JobRecord, workdir: Path) -> Path | None:
    """Download the job's newest full-state checkpoint, if it has one, to carry on from it."""
    checkpoint = record.resume_checkpoint
    if checkpoint is None:
        return None
    directory = workdir / "resume" / f"step-{checkpoint.step:08d}"
    storage.download_prefix(checkpoint.prefix, directory)
    return directory
