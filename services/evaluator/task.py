"""The evaluation task: the base model and the fine-tuned model on the same held-out rows.

It reports loss, perplexity and token accuracy for both, stores the report beside the
artifacts, names the fine-tuned model and moves the job to `succeeded`.
"""

from __future__ import annotations

import json
import logging
import signal
import tempfile
from pathlib import Path
from typing import Any

from redis import Redis

from shared import metrics, storage_keys
from shared.catalog import load_catalog, materialize
from shared.chat_data import iter_batches, read_conversations, tokenize_chat
from shared.failures import JobFailure, classify
from shared.file_store import FileStore
from shared.job_states import JobState
from shared.job_store import JobStore, StaleAttempt
from shared.lm_metrics import evaluate_causal_lm
from shared.model_card import render_model_card
from shared.model_loading import default_device, generation_eos_ids, load_causal_lm, weights_dtype
from shared.queue import enqueue_evaluation
from shared.records import JobRecord, fine_tuned_model_id
from shared.runtime import connect
from shared.settings import Settings
from shared.storage import Storage

log = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 8


class EvaluationPreempted(Exception):
    pass


def _preempt(signum: int, frame: object) -> None:
    raise EvaluationPreempted()


def run_evaluation(job_id: str, attempt: int) -> str:
    """RQ entry point: evaluate one job's trained attempt."""
    signal.signal(signal.SIGTERM, _preempt)
    runtime = connect()
    settings, redis, storage, jobs = runtime.settings, runtime.redis, runtime.storage, runtime.jobs
    record = jobs.get(job_id)
    if record is None or record.attempt != attempt or record.state is not JobState.EVALUATING:
        state = record.state.value if record else "missing"
        log.info("skipping evaluation of %s attempt %s: job is %s", job_id, attempt, state)
        return f"skipped ({state})"
    try:
        report = evaluate(settings, redis, storage, record)
        _succeed(jobs, storage, record, report, settings, redis)
        metrics.TASKS_FINISHED.labels("evaluator", "succeeded").inc()
        return "succeeded"
    except EvaluationPreempted:
        # Evaluation holds no state worth saving: run it again on the next worker.
        jobs.add_event(job_id, "Evaluator is shutting down; evaluation re-queued", level="warn")
        enqueue_evaluation(redis, job_id, attempt, settings.eval_timeout_seconds)
        return "preempted"
    except StaleAttempt as exc:
        log.warning("%s", exc)
        return "stale attempt"
    except Exception as exc:
        error, expected = classify(exc)
        try:
            jobs.transition(
                job_id, JobState.FAILED, f"Evaluation failed: {error.message}", level="error",
                expected_attempt=attempt, error=error,
            )  # fmt: skip
        except Exception:
            log.exception("could not mark %s failed", job_id)
        metrics.TASKS_FINISHED.labels("evaluator", "failed").inc()
        if not expected:
            raise
        return f"failed: {error.code}"


def _validation_rows(
    redis: Redis, storage: Storage, record: JobRecord, workdir: Path
) -> tuple[list[list[dict[str, Any]]], str]:
    path = workdir / "validation.jsonl"
    if record.validation_file:
        file = FileStore(redis).get(record.validation_file, record.tenant)
        if file is None:
            raise JobFailure("file_not_found", f"validation file {record.validation_file} was deleted")
        storage.download_file(file.storage_key, path)
        return read_conversations(
            path, file.filename, redact=record.data_policy == "redact"
        ), "validation_file"
    storage.download_file(storage_keys.validation_split_key(record.tenant, record.id), path)
    return read_conversations(path, "validation_split.jsonl"), "held_out_split"


def evaluate(settings: Settings, redis: Redis, storage: Storage, record: JobRecord) -> dict[str, Any]:
    from peft import PeftModel
    from transformers import AutoTokenizer

    catalog = load_catalog(settings)
    entry = catalog.get(record.model)
    if entry is None:
        raise JobFailure("model_not_found", f"model {record.model!r} is no longer in the catalog", "model")
    with tempfile.TemporaryDirectory(prefix=f"tunery-eval-{record.id}-") as tmp:
        workdir = Path(tmp)
        base_dir = materialize(entry, settings)
        adapter_dir = workdir / "adapter"
        storage.download_prefix(storage_keys.adapter_prefix(record.tenant, record.id), adapter_dir)
        tokenizer_dir = workdir / "tokenizer"
        storage.download_prefix(storage_keys.tokenizer_prefix(record.tenant, record.id), tokenizer_dir)
        rows, source = _validation_rows(redis, storage, record, workdir)

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        trust = settings.allow_trust_remote_code
        device = default_device()
        model = load_causal_lm(base_dir, trust_remote_code=trust, dtype=weights_dtype(device)).to(device)
        eos_ids = generation_eos_ids(base_dir, tokenizer, trust_remote_code=trust)
        examples = [
            tokenize_chat(tokenizer, m, record.hyperparameters.max_seq_length, eos_token_ids=eos_ids)
            for m in rows
        ]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

        base = evaluate_causal_lm(model, iter_batches(examples, EVAL_BATCH_SIZE, pad_id))
        tuned_model = PeftModel.from_pretrained(model, adapter_dir)
        tuned = evaluate_causal_lm(tuned_model, iter_batches(examples, EVAL_BATCH_SIZE, pad_id))
    change = tuned["loss"] - base["loss"]
    verdict = "improved" if change < -1e-3 else "regressed" if change > 1e-3 else "unchanged"
    return {
        "validation_source": source,
        "n_examples": len(rows),
        "n_tokens": base["n_tokens"],
        "base": {k: base[k] for k in ("loss", "perplexity", "mean_token_accuracy")},
        "fine_tuned": {k: tuned[k] for k in ("loss", "perplexity", "mean_token_accuracy")},
        "verdict": verdict,
        "loss_change": change,
    }


def _succeed(
    jobs: JobStore,
    storage: Storage,
    record: JobRecord,
    report: dict[str, Any],
    settings: Settings,
    redis: Redis,
) -> None:
    report_key = storage_keys.evaluation_report_key(record.tenant, record.id)
    storage.put_bytes(report_key, json.dumps(report, indent=2).encode())
    named = record.model_copy(update={"fine_tuned_model": fine_tuned_model_id(record)})
    card = render_model_card(
        named,
        load_catalog(settings).get(record.model),
        FileStore(redis).get(record.training_file, record.tenant),
        report,
    )
    card_key = storage_keys.model_card_key(record.tenant, record.id)
    storage.put_bytes(card_key, card.encode())
    base, tuned = report["base"], report["fine_tuned"]
    jobs.add_event(
        record.id,
        f"Evaluation complete on {report['n_examples']} {report['validation_source']} rows: "
        f"loss {base['loss']:.4f} → {tuned['loss']:.4f} ({report['verdict']})",
        data=report,
    )
    model_id = fine_tuned_model_id(record)

    def finish(job: JobRecord) -> None:
        job.fine_tuned_model = model_id
        job.evaluation = report
        job.artifacts["evaluation"] = report_key
        job.artifacts["model_card"] = card_key

    done = jobs.transition(
        record.id,
        JobState.SUCCEEDED,
        f"Job succeeded: {model_id}",
        expected_attempt=record.attempt,
        mutate=finish,
    )
    jobs.register_fine_tuned_model(done)
