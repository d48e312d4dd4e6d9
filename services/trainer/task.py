"""The training task an RQ work horse runs: one attempt at one job, from queued to evaluating.

It fetches what the job needs, runs the recipe of the job's method (supervised fine-tuning, text
classification or DPO) with hooks that report progress and obey cancel and preemption, publishes the
artifacts, and hands the job to the evaluator. A stale attempt (the job moved on without it) never
publishes anything.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import tempfile
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any, get_type_hints

from services.trainer.driver import StepMetrics, StopAction, TrainConfig, TrainResult
from services.trainer.job_checkpoints import JobCheckpoints, fetch_resume_checkpoint
from services.trainer.launch import run_launched, world_size
from services.trainer.run import Preemption, ProgressHooks, RunContext
from shared.data.splits import holdout_split
from shared.methods import load, method
from shared.ml.chat_data import ChatTemplateError, DataError
from shared.ml.classification_data import LABELS_FILE
from shared.ml.export import merge_adapter
from shared.ml.materialize import materialize
from shared.ml.task_data import read_rows, split_jsonl
from shared.planning.calibration import record_throughput
from shared.planning.catalog import load_catalog
from shared.planning.estimate import count_optimizer_steps
from shared.platform import metrics, storage_keys
from shared.platform.cancel import withdraw_if_cancelled
from shared.platform.failures import JobFailure, classify
from shared.platform.file_store import FileStore
from shared.platform.ids import new_file_id, new_id
from shared.platform.job_states import JobState
from shared.platform.job_store import JobStore, StaleAttempt
from shared.platform.queue import enqueue_evaluation
from shared.platform.records import FileRecord, JobError, JobRecord, fine_tuned_model_id, now
from shared.platform.recovery import requeue_as_new_attempt
from shared.platform.runtime import connect

log = logging.getLogger(__name__)

# The columns of the supervised CSV, which OpenAI's checkpoint metrics name (the rest are added as they are).
OPENAI_ROW_KEYS = frozenset(method("supervised").result_columns)


def run_training(job_id: str, attempt: int) -> str:
    """RQ entry point. Returns a short outcome for RQ's own record."""
    Preemption.install()
    runtime = connect()
    settings, redis, storage, jobs = runtime.settings, runtime.redis, runtime.storage, runtime.jobs
    record = jobs.get(job_id)
    if record is None or record.attempt != attempt or record.state is not JobState.QUEUED:
        state = record.state.value if record else "missing"
        log.info("skipping %s attempt %s: job is %s", job_id, attempt, state)
        return f"skipped ({state})"
    try:
        jobs.transition(job_id, JobState.RUNNING, "Training started", expected_attempt=attempt)
        return TrainingRun(settings, redis, storage, jobs, record).run()
    except StaleAttempt as exc:
        log.warning("%s", exc)
        return "stale attempt"
    except Exception as exc:
        error, expected = classify(exc)
        _fail(jobs, job_id, attempt, error)
        metrics.TASKS_FINISHED.labels("trainer", "failed").inc()
        if not expected:
            raise
        return f"failed: {error.code}"


def _fail(jobs: JobStore, job_id: str, attempt: int, error: Any) -> None:
    try:
        jobs.transition(
            job_id, JobState.FAILED, f"Job failed: {error.message}", level="error",
            expected_attempt=attempt, error=error,
        )  # fmt: skip
    except Exception:  # already cancelled or moved on: nothing to report
        log.exception("could not mark %s failed", job_id)


class TrainingRun(RunContext):
    """The work horse's attempt: fetch, train (here or under `accelerate launch`), publish."""

    def run(self) -> str:
        with tempfile.TemporaryDirectory(prefix=f"tunery-{self.job_id}-") as tmp:
            self.workdir = Path(tmp)
            model_dir = self._fetch_model()
            train_rows, valid_rows, valid_source = self._fetch_data()
            total_steps = self._total_steps(len(train_rows))
            n_train = len(train_rows) - self._skipped("training")
            n_valid = len(valid_rows) - self._skipped("validation")
            self._event(
                f"Training started: {n_train} examples, validating on {n_valid} ({valid_source}); "
                f"{total_steps} steps",
                data={"train_examples": n_train, "valid_examples": n_valid,
                      "validation_source": valid_source, "total_steps": total_steps},
            )  # fmt: skip
            resume_from = self._resume_point()
            hooks = ProgressHooks(self, total_steps)
            try:
                swept = bool(self.record.sweep_results)  # an earlier attempt's sweep already chose
                if (
                    self.record.learning_rate_sweep
                    and not swept
                    and not self._sweep(model_dir, train_rows, valid_rows, hooks)
                ):
                    hooks.account()
                    if hooks.budget_reason:
                        message = f"{hooks.budget_reason} during the learning-rate sweep; nothing was trained"
                        raise JobFailure("budget_exceeded", message)
                    return self._stopped(hooks)
                config = self._config(model_dir, train_rows, valid_rows)
                config.checkpoints = JobCheckpoints(
                    self.settings, self.storage, self.jobs, self.record, hooks.send_rows
                )
                config.resume_from = resume_from
                result = self._train(config, hooks)
            except DataError as exc:
                raise JobFailure("invalid_training_data", str(exc), "training_file") from exc
            except ChatTemplateError as exc:
                raise JobFailure("unsupported_chat_template", str(exc), "model") from exc
            hooks.account()
            if result.stopped in ("discard", "suspend"):
                return self._stopped(hooks)
            self._calibrate(hooks, result)
            if result.early_stopped:
                self._event(
                    f"Early stopping: the validation loss stopped improving (step {result.steps_completed})"
                )
            self._publish(result, model_dir, budget_reason=hooks.budget_reason)
            metrics.TASKS_FINISHED.labels("trainer", "budget" if hooks.budget_reason else "trained").inc()
            return "budget reached" if hooks.budget_reason else "trained"

    def _train(self, config: TrainConfig, hooks: ProgressHooks) -> TrainResult:
        """The one place a job's recipe runs: its method's, in this process, or in one process per device
        under `accelerate launch` when the job has several (services.trainer.launch)."""
        recipe = method(self.record.method_type).recipe
        if world_size(self.record) > 1:
            return run_launched(self, recipe, config, hooks, hooks.total_steps)
        return self._recipe()(config, hooks)

    def _event(self, message: str, **kwargs: Any) -> None:
        self.jobs.add_event(self.job_id, message, **kwargs)

    def _resume_point(self) -> Path | None:
        """The checkpoint an earlier attempt left, downloaded; None to train from the first step."""
        checkpoint = self.record.resume_checkpoint
        directory = fetch_resume_checkpoint(self.storage, self.record, self.workdir)
        if checkpoint is None or directory is None or not directory.is_dir():
            if checkpoint is not None:
                self._event(
                    f"Checkpoint {checkpoint.id} (step {checkpoint.step}) is missing from storage; "
                    "training from the first step", level="warn",
                )  # fmt: skip
            self.jobs.reset_step_metrics(self.job_id)
            return None
        self.jobs.keep_step_metrics(self.job_id, checkpoint.step)
        self._event(
            f"Resuming from checkpoint {checkpoint.id} at step {checkpoint.step} (saved by attempt "
            f"{checkpoint.attempt + 1}); steps after it are trained again",
            data={"checkpoint": checkpoint.id, "step": checkpoint.step, "saved_by_attempt": checkpoint.attempt},
        )  # fmt: skip
        return directory

    def _fetch_model(self) -> Path:
        catalog = load_catalog(self.settings)
        entry = catalog.get(self.record.model)
        if entry is None:
            raise JobFailure(
                "model_not_found", f"model {self.record.model!r} is no longer in the catalog", "model"
            )
        self._event(f"Fetching base model {entry.id}")
        return materialize(entry, self.settings)

    def _download_rows(self, file_id: str, param: str) -> list[Any]:
        file = FileStore(self.redis).get(file_id, self.record.tenant)
        if file is None:
            raise JobFailure(
                "file_not_found", f"{param} {file_id} was deleted before training started", param
            )
        path = self.workdir / file_id
        self.storage.download_file(file.storage_key, path)
        # Examples, read by the method's data kind: a held-out split keeps each row's fields (e.g. group).
        return read_rows(
            path, file.filename, self.record.method_type, redact=self.record.data_policy == "redact"
        )

    def _fetch_data(self) -> tuple[list, list, str]:
        rows = self._download_rows(self.record.training_file, "training_file")
        if self.record.validation_file:
            train, valid = rows, self._download_rows(self.record.validation_file, "validation_file")
            source = "validation_file"
        else:
            train, valid = holdout_split(rows, self.record.split_seed)
            # Already redacted (data_policy redact): the evaluator reads the split as it is.
            key = storage_keys.validation_split_key(self.record.tenant, self.job_id)
            self.storage.put_bytes(key, split_jsonl(valid))
            source = "held_out_split"
        return train, valid, source

    def _sweep(self, model_dir: Path, train_rows: list, valid_rows: list, hooks: ProgressHooks) -> bool:
        """Short trials of each learning-rate multiplier; the one of lowest validation loss is kept on the
        job for the full run. False when a trial was stopped (cancel, pause, preemption, budget)."""
        sweep = self.record.learning_rate_sweep
        hp = self.record.hyperparameters
        base = hp.learning_rate / hp.learning_rate_multiplier
        total = self._total_steps(len(train_rows))
        steps = max(1, math.ceil(total * sweep.trial_fraction))
        results = []
        for multiplier in sweep.multipliers:
            config = self._config(model_dir, train_rows, valid_rows)
            config.learning_rate, config.max_steps = base * multiplier, steps
            config.early_stopping_patience = None
            trial = self._recipe()(config, TrialHooks(hooks))
            if trial.trial_valid is None:
                return False
            result = {
                "learning_rate_multiplier": multiplier, "learning_rate": config.learning_rate, "steps": trial.steps_completed,
                "valid_loss": trial.trial_valid["loss"], "valid_mean_token_accuracy": trial.trial_valid["mean_token_accuracy"],
            }  # fmt: skip
            results.append(result)
            self._event(
                f"Learning-rate trial ×{multiplier:g} ({config.learning_rate:.2e}, {steps} steps): "
                f"validation loss {result['valid_loss']:.4f}",
                data=result,
            )
        best = min(results, key=lambda r: r["valid_loss"])

        def choose(record: JobRecord) -> None:
            record.sweep_results = results
            chosen = record.hyperparameters
            chosen.learning_rate_multiplier = best["learning_rate_multiplier"]
            chosen.learning_rate = best["learning_rate"]
            chosen.reasons["learning_rate_multiplier"] = (
                f"sweep: lowest validation loss ({best['valid_loss']:.4f}) of {len(results)} trials of {steps} steps"
            )

        self.record = self.jobs.update(self.job_id, choose, expected_attempt=self.record.attempt)
        self._event(
            f"Learning-rate sweep chose ×{best['learning_rate_multiplier']:g}; training the job with it"
        )
        return True

    def _total_steps(self, n_train: int) -> int:
        """The job's optimizer steps: packed rows come from the estimate, which knows the token lengths,
        and so do the examples the recipe skips (truncation leaves them nothing to train on)."""
        hp = self.record.hyperparameters
        estimate = self.record.estimate or {}
        if hp.packing and estimate.get("optimizer_steps"):
            return estimate["optimizer_steps"]
        return count_optimizer_steps(
            n_train - self._skipped("training"), hp.micro_batch_size, hp.gradient_accumulation_steps,
            hp.n_epochs, hp.processes,
        )  # fmt: skip

    def _skipped(self, dataset: str) -> int:
        """Examples of `dataset` (training, validation) the recipe skips, as data preparation counted them:
        the sequence length leaves them nothing to train on (the warning event named them)."""
        skipped = (self.record.estimate or {}).get("skipped_examples") or {}
        return skipped.get(dataset, {}).get("count", 0)

    def _config(self, model_dir: Path, train_rows: list, valid_rows: list) -> TrainConfig:
        """The config of the job's recipe (the type of its `config` argument), each field filled by name:
        what every recipe shares from the job and this worker, then the method's own resolved settings
        (DPO's beta, classification's class weights...), so no method is named here."""
        hp = self.record.hyperparameters
        lora = self.record.lora
        offered: dict[str, Any] = {
            **hp.model_dump(),
            "model_dir": model_dir,
            "output_dir": self.workdir / "output",
            "train_examples": train_rows,
            "valid_examples": valid_rows,
            "batch_size": hp.micro_batch_size,  # per micro-batch and process; hp.batch_size is the effective one
            "lora_r": lora.r,
            "lora_alpha": lora.alpha,
            "lora_dropout": lora.dropout,
            "target_modules": lora.target_modules,
            "seed": self.record.seed,
            "torch_threads": self.settings.resolved_torch_threads,
            "trust_remote_code": self.settings.allow_trust_remote_code,
            # Per tenant: cached token ids are the data itself, and go when the tenant's data goes.
            "token_cache": self.storage,
            "token_cache_prefix": storage_keys.tenant_prefix(self.record.tenant) + "cache/tokenized/",
        }
        config_type = get_type_hints(self._recipe())["config"]
        return config_type(**{f.name: offered[f.name] for f in fields(config_type) if f.name in offered})

    def _recipe(self) -> Callable[..., TrainResult]:
        return load(method(self.record.method_type).recipe)

    def _stopped(self, hooks: ProgressHooks) -> str:
        if hooks.preempted:
            saved = self.jobs.require(self.job_id).resume_checkpoint
            where = f"it carries on from step {saved.step}" if saved else "it trains from the first step"
            message = f"Worker is shutting down; job returned to the queue ({where})"
            requeue_as_new_attempt(self.jobs, self.redis, self.settings, self.record, message, level="warn")
            return "preempted"
        return "stopped"

    def _calibrate(self, hooks: ProgressHooks, result: TrainResult) -> None:
        """Feed the measured speed back into the estimates of this GPU class."""
        estimate = self.record.estimate or {}
        if not estimate.get("train_flops") or not result.total_steps:
            return
        done = estimate["train_flops"] * result.steps_completed / result.total_steps
        record_throughput(self.redis, self.record.gpu_class, done, hooks.training_seconds)

    def _upload_artifacts(self) -> dict[str, str]:
        """What the recipe saved: the adapter (LoRA) or the whole model (a classifier trained in full),
        the tokenizer, and a classifier's labels; artifact name → storage key."""
        tenant, output = self.record.tenant, self.workdir / "output"
        folders = {
            "adapter": storage_keys.adapter_prefix,
            "model": storage_keys.model_prefix,
            "tokenizer": storage_keys.tokenizer_prefix,
        }
        artifacts = {}
        for name, prefix_of in folders.items():
            if (output / name).is_dir():
                artifacts[name] = prefix_of(tenant, self.job_id)
                self.storage.upload_directory(output / name, artifacts[name])
        if (output / LABELS_FILE).is_file():
            artifacts["labels"] = storage_keys.labels_key(tenant, self.job_id)
            self.storage.upload_file(output / LABELS_FILE, artifacts["labels"])
        return artifacts

    def _publish(self, result: TrainResult, model_dir: Path, budget_reason: str | None = None) -> None:
        tenant = self.record.tenant
        output = self.workdir / "output"
        uploaded = self._upload_artifacts()
        result_file = self._store_result_csv(result.metrics_rows)
        self._event(f"Artifacts uploaded: {', '.join(uploaded)}, step metrics")
        merged = None
        if self.record.export_merged and not budget_reason:
            merged_dir = merge_adapter(
                model_dir, output / "adapter", output / "tokenizer", self.workdir / "merged",
                trust_remote_code=self.settings.allow_trust_remote_code,
            )  # fmt: skip
            merged = storage_keys.merged_prefix(tenant, self.job_id)
            self.storage.upload_directory(merged_dir, merged)
            self._event("Merged model exported (base with the adapter merged in, safetensors)")
        self._record_checkpoint(result, uploaded)
        attempt = self.record.attempt

        def finish_training(record: JobRecord) -> None:
            record.progress.step = result.steps_completed
            record.progress.total_steps = result.total_steps
            record.progress.trained_tokens = result.trained_tokens
            record.trained_tokens = result.trained_tokens
            record.result_files = [result_file.id]
            record.artifacts = uploaded | ({"merged": merged} if merged else {})
            record.estimated_finish = None

        if budget_reason:
            # Budget semantics: the adapter trained so far is kept (artifacts and a checkpoint), the job
            # ends `failed` with code budget_exceeded, and no evaluation runs.
            message = (
                f"{budget_reason}: training stopped at step {result.steps_completed} of {result.total_steps}; "
                "the adapter trained so far is saved as the job's checkpoint"
            )
            self.jobs.transition(
                self.job_id, JobState.FAILED, message, level="error", expected_attempt=attempt,
                mutate=finish_training, error=JobError(code="budget_exceeded", message=message),
            )  # fmt: skip
            return
        self.jobs.transition(
            self.job_id, JobState.EVALUATING,
            f"Training finished after {result.steps_completed} steps; evaluating",
            expected_attempt=attempt, mutate=finish_training,
        )  # fmt: skip
        enqueue_evaluation(self.redis, self.job_id, attempt, self.settings.eval_timeout_seconds)
        withdraw_if_cancelled(self.jobs, self.redis, self.job_id)

    def _record_checkpoint(self, result: TrainResult, artifacts: dict[str, str]) -> None:
        """The final adapter (or model), listed as OpenAI lists a job's checkpoints."""
        last = result.metrics_rows[-1]
        weights = "adapter" if "adapter" in artifacts else "model"
        self._event(
            f"Checkpoint saved at step {result.steps_completed}", data={"step": result.steps_completed}
        )
        self.jobs.add_checkpoint(
            self.job_id,
            {
                "id": new_id("ftckpt"),
                "object": "fine_tuning.job.checkpoint",
                "created_at": now(),
                "fine_tuned_model_checkpoint": f"{fine_tuned_model_id(self.record)}:ckpt-step-{result.steps_completed}",
                "fine_tuning_job_id": self.job_id,
                "step_number": result.steps_completed,
                "metrics": {
                    "step": float(result.steps_completed),
                    "train_loss": last["train_loss"],
                    "train_mean_token_accuracy": last["train_accuracy"],
                    "valid_loss": last["valid_loss"],
                    "valid_mean_token_accuracy": last.get("valid_mean_token_accuracy"),
                    "full_valid_loss": last["valid_loss"],
                    "full_valid_mean_token_accuracy": last.get("valid_mean_token_accuracy"),
                }
                # The recipe's own figures (classification, DPO) as they are named in its result CSV.
                | {key: value for key, value in last.items() if key not in OPENAI_ROW_KEYS},
                # Tunery extra: where the adapter (or a classifier's whole model) of this checkpoint is stored.
                weights: artifacts[weights],
            },
        )

    def _store_result_csv(self, rows: list[dict[str, Any]]) -> FileRecord:
        columns = method(self.record.method_type).result_columns
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})
        file_id = new_file_id()
        key = storage_keys.file_key(self.record.tenant, file_id)
        stored = self.storage.put_stream(key, io.BytesIO(text.getvalue().encode()))
        record = FileRecord(
            id=file_id, tenant=self.record.tenant, filename=f"{self.job_id}_step_metrics.csv",
            purpose="fine-tune-results", bytes=stored.size, created_at=now(), status="processed",
            sha256=stored.sha256, storage_key=key, format="csv", n_examples=len(rows),
        )  # fmt: skip
        FileStore(self.redis).save(record)
        return record


class TrialHooks:
    """A learning-rate trial: stops as the job would (cancel, pause, preemption, budget), reports nothing."""

    def __init__(self, job_hooks: ProgressHooks):
        self.job_hooks = job_hooks

    def on_step(self, m: StepMetrics) -> None:
        pass

    def on_epoch_end(self, epoch: int, valid_metrics: dict | None) -> None:
        pass

    def should_stop(self) -> StopAction | None:
        return "discard" if self.job_hooks.should_stop() else None
