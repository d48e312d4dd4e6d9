"""What every rank of a training attempt shares: the attempt's context, its progress hooks, the preemption signal.

The work horse (`services.trainer.task`) and each process launched on a device (`services.trainer.launch`)
build the same hooks around the same context; they live here so that neither of those modules imports the
other.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis import Redis

from services.trainer.driver import StepMetrics, StopAction
from shared.methods import method
from shared.planning.cost import cost_usd
from shared.planning.gpu_classes import load_gpu_classes
from shared.platform import metrics
from shared.platform.job_states import JobState
from shared.platform.job_store import JobStore
from shared.platform.records import JobRecord, now
from shared.platform.settings import Settings
from shared.platform.storage import Storage
from shared.platform.usage import add_usage


class Preemption:
    """Set by SIGTERM (passed on by the worker): stop at the next step and requeue the job."""

    requested = False

    @classmethod
    def install(cls) -> None:
        cls.requested = False
        signal.signal(signal.SIGTERM, cls._handle)

    @classmethod
    def _handle(cls, signum: int, frame: object) -> None:
        cls.requested = True


@dataclass
class RunContext:
    """One attempt at one job as a rank sees it: its connections, its record and its work directory."""

    settings: Settings
    redis: Redis
    storage: Storage
    jobs: JobStore
    record: JobRecord
    workdir: Path = field(init=False)

    @property
    def job_id(self) -> str:
        return self.record.id


class ProgressHooks:
    """Reports steps as job progress and metrics events, keeps the job's usage and cost current,
    and says when the loop must stop: cancel, pause or preemption (discard), a budget (save).

    No step waits on Redis: the steps' metrics rows are sent, and the job's record (its state: cancel,
    pause) read, at most every POLL_SECONDS, in one round trip; a tiny model's step takes ~10 ms, and two
    round trips a step cost it a tenth of its time on a busy machine. The progress report (an event and
    the record's progress) goes every TUNERY_PROGRESS_INTERVAL_SECONDS and after the last step.
    """

    POLL_SECONDS = 0.25

    def __init__(self, run: RunContext, total_steps: int):
        self.run = run
        self.total_steps = total_steps
        self.gpu_class = run.record.gpu_class
        self.price = load_gpu_classes(run.settings.gpu_classes)[self.gpu_class]
        self.devices = run.record.num_gpus * run.record.num_nodes  # cost counts every device held
        self.interval = run.settings.progress_interval_seconds
        self.last_report = 0.0
        resumed = run.record.resume_checkpoint
        self.last_tokens = resumed.trained_tokens if resumed else 0
        self.started = time.monotonic()
        self.accounted = 0.0  # device-seconds already added to the job's usage
        self.training_seconds = 0.0
        self.preempted = False
        self.budget_reason: str | None = None
        self.last_step = 0
        self.rows: list[dict[str, Any]] = []  # step metrics not yet sent
        self.polled = -math.inf  # when the record was last read
        self.record: JobRecord | None = run.record

    def device_seconds(self) -> float:
        return (time.monotonic() - self.started) * self.devices

    def account(self) -> None:
        """Add the device-seconds since the last call to the job's usage, and to the cost metrics."""
        total = self.device_seconds()
        delta, self.accounted = total - self.accounted, total
        cost = cost_usd(self.price, delta)
        metrics.DEVICE_SECONDS.labels(self.gpu_class).inc(delta)
        metrics.COST_USD.labels(self.run.record.tenant, self.gpu_class).inc(cost)
        add_usage(self.run.redis, self.run.record.tenant, self.gpu_class, delta, cost)

        def add(record: JobRecord) -> None:
            record.usage.device_seconds += delta
            record.usage.cost_usd += cost

        self.run.jobs.update(self.run.job_id, add, expected_attempt=self.run.record.attempt)

    def on_step(self, m: StepMetrics) -> None:
        metrics.TRAINED_TOKENS.labels(self.gpu_class).inc(m.trained_tokens - self.last_tokens)
        metrics.TRAINING_STEP_SECONDS.labels(self.gpu_class).observe(m.step_seconds)
        metrics.TRAINING_TOKENS_PER_SECOND.labels(self.gpu_class).set(m.tokens_per_second)
        self.last_tokens = m.trained_tokens
        self.training_seconds = time.monotonic() - self.started
        self.last_step = m.step
        self.rows.append(
            {"kind": "train", "step": m.step, "epoch": round(m.epoch, 4), "train_loss": m.train_loss,
             "train_mean_token_accuracy": m.train_accuracy, "learning_rate": m.learning_rate,
             "grad_norm": m.grad_norm, "tokens_per_second": m.tokens_per_second, "step_seconds": m.step_seconds}
        )  # fmt: skip
        clock = time.monotonic()
        if clock - self.last_report < self.interval and m.step != m.total_steps:
            return
        self.last_report = clock
        self.send_rows()
        remaining = self.training_seconds / m.step * (m.total_steps - m.step) if m.step else None
        self.account()
        data = {
            "step": m.step, "total_steps": m.total_steps, "epoch": round(m.epoch, 4),
            "train_loss": m.train_loss, "train_mean_token_accuracy": m.train_accuracy,
            "learning_rate": m.learning_rate, "grad_norm": m.grad_norm,
            "tokens_per_second": round(m.tokens_per_second, 1), "trained_tokens": m.trained_tokens,
            "device_seconds": round(self.accounted, 3),
        }  # fmt: skip
        self.run.jobs.add_event(
            self.run.job_id, f"Step {m.step}/{m.total_steps}: training loss={m.train_loss:.4f}",
            type="metrics", data=data,
        )  # fmt: skip

        def progress(record: JobRecord) -> None:
            record.progress.step = m.step
            record.progress.total_steps = m.total_steps
            record.progress.epoch = m.epoch
            record.progress.train_loss = m.train_loss
            record.progress.learning_rate = m.learning_rate
            record.progress.tokens_per_second = m.tokens_per_second
            record.progress.trained_tokens = m.trained_tokens
            record.progress.updated_at = now()
            record.estimated_finish = now() + int(remaining) if remaining is not None else None

        self.run.jobs.update(self.run.job_id, progress, expected_attempt=self.run.record.attempt)

    def on_epoch_end(self, epoch: int, valid_metrics: dict | None) -> None:
        """The method's `validation_metrics`, e.g. "validation loss=0.41, accuracy=0.88"."""
        detail = ""
        if valid_metrics:
            names = method(self.run.record.method_type).validation_metrics
            detail = "; validation " + ", ".join(f"{name}={valid_metrics[name]:.4f}" for name in names)
            self.send_rows()
            self.run.jobs.add_step_metrics(
                self.run.job_id,
                {"kind": "validation", "step": self.last_step, "epoch": epoch}
                | {f"valid_{name}": valid_metrics[name] for name in names},
            )
        self.run.jobs.add_event(self.run.job_id, f"Epoch {epoch} complete{detail}", data=valid_metrics)

    def send_rows(self) -> None:
        """The step metrics not yet sent, appended to the job's series."""
        self.run.jobs.add_step_metrics(self.run.job_id, *self.rows)
        self.rows.clear()

    def should_stop(self) -> StopAction | None:
        action = self._stop_action()
        if action is not None:
            self.send_rows()  # the steps trained before the stop are all in the series
        return action

    def _stop_action(self) -> StopAction | None:
        if Preemption.requested:
            self.preempted = True
            return "suspend"
        clock = time.monotonic()
        if clock - self.polled >= self.POLL_SECONDS:
            self.polled = clock
            self.send_rows()
            self.record = self.run.jobs.get(self.run.job_id)
        record = self.record
        if record is None or record.attempt != self.run.record.attempt:
            return "discard"
        if record.state is JobState.PAUSED:
            return "suspend"  # resuming the job carries on from the checkpoint saved now
        if record.state is not JobState.RUNNING:
            return "discard"
        budget = record.budget
        spent = record.usage.device_seconds + (self.device_seconds() - self.accounted)
        if (
            budget.max_duration_seconds is not None
            and time.monotonic() - self.started >= budget.max_duration_seconds
        ):
            self.budget_reason = f"max_duration_seconds ({budget.max_duration_seconds} s) reached"
        elif budget.max_cost_usd is not None and cost_usd(self.price, spent) >= budget.max_cost_usd:
            self.budget_reason = f"max_cost_usd (${budget.max_cost_usd:g}) reached"
        return "save" if self.budget_reason else None
