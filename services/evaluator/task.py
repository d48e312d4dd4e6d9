"""The evaluation task: the base model and the fine-tuned model on the same held-out rows.

It reports loss, perplexity and token accuracy for both on every row, and what each model replies to
the first prompts (greedy, scored against the reference replies; shared.ml.generation_metrics), each
also per group of rows when the rows carry a group field, with the gap between the best and the worst
group. It stores the report and the replies beside the artifacts, names the fine-tuned model and moves
the job to `succeeded`. A job cancelled meanwhile stops its evaluation within a second
(services.evaluator.cancellation) and gets nothing published.
"""

from __future__ import annotations

import json
import logging
import signal
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from peft import PeftModel
from redis import Redis
from transformers import AutoTokenizer

from services.evaluator.base_cache import (
    CACHE_VERSION,
    BaseCache,
    ModelScores,
    model_fingerprint,
    rows_digest,
    tokenizer_fingerprint,
)
from services.evaluator.cancellation import CancelWatch, EvaluationCancelled, watching
from shared.data import pii
from shared.data.formats import read_examples
from shared.methods import DEFAULT_METHOD, load, method
from shared.ml.chat_data import DataError, Messages, TokenizedExample, iter_batches, tokenize_chat
from shared.ml.classification_data import DEFAULT_GROUP_FIELD
from shared.ml.generation_metrics import (
    GENERATION_METRICS,
    MAIN_METRIC,
    MAX_NEW_TOKENS,
    METRIC_NAMES,
    NEW_TOKEN_RULE,
    GenerationCase,
    corpus_scores,
    generate_replies,
    generation_cases,
    row_scores,
)
from shared.ml.group_metrics import group_members, largest_gap, pool_token_metrics
from shared.ml.lm_metrics import evaluate_causal_lm
from shared.ml.materialize import materialize
from shared.ml.model_loading import default_device, generation_eos_ids, load_causal_lm, weights_dtype
from shared.ml.threads import runs_on_one_thread, small_model_threads
from shared.planning.catalog import load_catalog
from shared.planning.model_card import render_model_card
from shared.platform import metrics, storage_keys
from shared.platform.cancel import withdraw_if_cancelled
from shared.platform.cpus import usable_cpus
from shared.platform.failures import JobFailure, classify
from shared.platform.file_store import FileStore
from shared.platform.forked import ForkedCall
from shared.platform.hub import push_to_hub
from shared.platform.job_states import JobState
from shared.platform.job_store import JobStore, StaleAttempt
from shared.platform.queue import enqueue_evaluation
from shared.platform.records import JobRecord, fine_tuned_model_id
from shared.platform.runtime import connect
from shared.platform.settings import Settings
from shared.platform.storage import Storage

log = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 8
# Prompts both models answer (the first suitable validation rows, in file order) unless
# TUNERY_EVAL_GENERATION_ROWS says otherwise: per device class, since a CPU generates far more slowly.
GENERATION_ROWS = {"cpu": 16, "cuda": 64}
GENERATION_BATCH_SIZE = 16
LOSS_TOLERANCE = 1e-3  # a loss change this small is "unchanged"
TOKEN_METRICS: tuple[str, ...] = ("loss", "perplexity", "mean_token_accuracy")
LOWER_IS_BETTER = frozenset({"loss", "perplexity"})


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
    # When it began, for the user (it may have waited for an evaluator since the job entered `evaluating`).
    jobs.add_event(job_id, "Evaluation started: the base and the fine-tuned model on the same held-out rows")
    watch = CancelWatch(jobs, job_id, attempt)
    try:
        report = evaluate_job(settings, redis, storage, record, watch=watch)
        _succeed(jobs, storage, record, report, settings, redis)
        metrics.TASKS_FINISHED.labels("evaluator", "succeeded").inc()
        return "succeeded"
    except EvaluationCancelled as exc:
        log.info("%s", exc)
        return "cancelled"
    except EvaluationPreempted:
        # Evaluation holds no state worth saving: run it again on the next worker, unless the job is over.
        state = watch.moved_on()
        if state is not None:
            log.info("evaluation of %s stopped by SIGTERM; not re-queued: the job is %s", job_id, state)
            return state
        jobs.add_event(job_id, "Evaluator is shutting down; evaluation re-queued", level="warn")
        enqueue_evaluation(redis, job_id, attempt, settings.eval_timeout_seconds)
        withdraw_if_cancelled(jobs, redis, job_id)
        return "preempted"
    except StaleAttempt as exc:
        log.warning("%s", exc)
        return "stale attempt"
    except Exception as exc:
        state = watch.moved_on()
        if state is not None:
            # Cancelled after the last check (publishing then fails): not an evaluation failure.
            log.info("evaluation of %s ended in %r; the job is %s", job_id, exc, state)
            return state
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


def evaluate_job(
    settings: Settings,
    redis: Redis,
    storage: Storage,
    record: JobRecord,
    *,
    group_field: str | None = DEFAULT_GROUP_FIELD,
    generation_rows: int | None = None,
    generations_key: str | None = None,
    watch: CancelWatch | None = None,
) -> dict[str, Any]:
    """The evaluation of the job's method, by the method's evaluator (shared.methods): its report, base and
    fine-tuned side by side, with a verdict. `watch`: stops it (EvaluationCancelled) once the job has moved
    on; the generation options apply to evaluators that generate replies (chat)."""
    evaluator = load(method(record.method_type).evaluator)
    report = evaluator(
        settings, redis, storage, record, group_field=group_field, generation_rows=generation_rows,
        generations_key=generations_key, watch=watch,
    )  # fmt: skip
    return {"task": record.method_type, **report}


@dataclass
class ValidationRows:
    conversations: list[Messages]
    groups: list[str | None]  # each row's group (its `group_field` value as a string), or None
    source: str  # validation_file or held_out_split


def _validation_rows(
    redis: Redis, storage: Storage, record: JobRecord, workdir: Path, group_field: str | None
) -> ValidationRows:
    if record.validation_file:
        return _file_rows(
            redis, storage, record.tenant, record.validation_file, workdir, record.data_policy, group_field
        )
    path = workdir / "validation.jsonl"
    storage.download_file(storage_keys.validation_split_key(record.tenant, record.id), path)
    # The trainer wrote the split already redacted.
    return _read_rows(path, "validation_split.jsonl", "held_out_split", redact=False, group_field=group_field)


def _file_rows(
    redis: Redis, storage: Storage, tenant: str, file_id: str, workdir: Path, data_policy: str,
    group_field: str | None,
) -> ValidationRows:  # fmt: skip
    file = FileStore(redis).get(file_id, tenant)
    if file is None:
        raise JobFailure("file_not_found", f"validation file {file_id} was deleted", "validation_file")
    path = workdir / "validation.jsonl"
    storage.download_file(file.storage_key, path)
    redact = data_policy == "redact"
    return _read_rows(path, file.filename, "validation_file", redact=redact, group_field=group_field)


def _read_rows(
    path: Path, filename: str, source: str, *, redact: bool, group_field: str | None
) -> ValidationRows:
    """Like chat_data.read_conversations (same conversion and redaction), keeping each row's group from
    the fields its format does not use."""
    with open(path, "rb") as f:
        examples = list(read_examples(f, filename=filename))
    if examples and examples[0].kind != "chat":
        raise DataError(f"{filename} holds {examples[0].kind} examples, not chat conversations")
    conversations = [example.messages or [] for example in examples]
    if redact:
        conversations = [
            [
                {**m, "content": pii.redact(m["content"])} if isinstance(m.get("content"), str) else m
                for m in c
            ]
            for c in conversations
        ]
    groups = [example.fields.get(group_field) if group_field else None for example in examples]
    return ValidationRows(conversations, [None if g is None else str(g) for g in groups], source)


def evaluate(
    settings: Settings,
    redis: Redis,
    storage: Storage,
    record: JobRecord,
    *,
    generation_rows: int | None = None,
    group_field: str | None = DEFAULT_GROUP_FIELD,
    generations_key: str | None = None,
    watch: CancelWatch | None = None,
) -> dict[str, Any]:
    """Score the base model and the fine-tuned adapter on the job's validation rows; returns the report
    (`build_report`) and stores the replies both models generated (by default as the job's generations
    artifact). The base model's side comes from the base-results cache when an earlier evaluation
    computed it from the same inputs (services.evaluator.base_cache).

    `generation_rows`: how many prompts (the first suitable rows) both models answer; 0 skips generation;
    None: `generation_plan`'s (the setting, else the default for this device class).
    `group_field`: the row field whose values are reported as groups (None: no groups).
    `watch`: stops the scoring (EvaluationCancelled) once the job has moved on; a job's evaluation (one
    with a watch) also tells the job, in an event, what it generates and whether the base side was cached.
    """
    entry = _catalog_entry(settings, record.model)
    plan = generation_plan(settings, generation_rows)
    with tempfile.TemporaryDirectory(prefix=f"tunery-eval-{record.id}-") as tmp:
        workdir = Path(tmp)
        adapter_dir = workdir / "adapter"
        storage.download_prefix(storage_keys.adapter_prefix(record.tenant, record.id), adapter_dir)
        tokenizer_dir = workdir / "tokenizer"
        storage.download_prefix(storage_keys.tokenizer_prefix(record.tenant, record.id), tokenizer_dir)
        rows = _validation_rows(redis, storage, record, workdir, group_field)
        base, tuned, cases = _score(
            settings, storage, record.tenant, entry, tokenizer_dir, adapter_dir, rows,
            record.hyperparameters.max_seq_length, plan, watch,
        )  # fmt: skip
    assert tuned is not None
    if cases:
        lines = generation_records(cases, rows.groups, base.replies, tuned.replies)
        body = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()
        storage.put_bytes(generations_key or storage_keys.generations_key(record.tenant, record.id), body)
    report = build_report(rows.source, rows.groups, cases, base, tuned, group_field=group_field)
    if report["generation"]:
        report["generation"]["prompt_limit"] = plan.describe()
    return report


@dataclass(frozen=True)
class GenerationPlan:
    """How many prompts the models answer, and why that many."""

    rows: int
    origin: str  # "requested", "TUNERY_EVAL_GENERATION_ROWS" or "the default on <device class>"

    def describe(self) -> str:
        return f"at most {self.rows} prompts ({self.origin})"


def generation_plan(settings: Settings, requested: int | None = None) -> GenerationPlan:
    """The prompts to answer: as requested, else the operator's setting, else GENERATION_ROWS for the
    device class this evaluator scores on (a CPU gets fewer: generation dominates its evaluation)."""
    if requested is not None:
        return GenerationPlan(requested, "requested")
    if settings.eval_generation_rows is not None:
        return GenerationPlan(settings.eval_generation_rows, "TUNERY_EVAL_GENERATION_ROWS")
    device = default_device().type
    return GenerationPlan(GENERATION_ROWS.get(device, GENERATION_ROWS["cpu"]), f"the default on {device}")


def evaluate_base_model(
    settings: Settings,
    redis: Redis,
    storage: Storage,
    tenant: str,
    model: str,
    validation_file: str,
    *,
    generation_rows: int | None = None,
    group_field: str | None = DEFAULT_GROUP_FIELD,
) -> dict[str, Any]:
    """A catalog chat model alone on a validation file: the base side of `evaluate`'s report (from the
    base-results cache when a job or an earlier evaluation computed it from the same inputs)."""
    entry = _catalog_entry(settings, model)
    plan = generation_plan(settings, generation_rows)
    with tempfile.TemporaryDirectory(prefix="tunery-eval-base-") as tmp:
        workdir = Path(tmp)
        rows = _file_rows(redis, storage, tenant, validation_file, workdir, "warn", group_field)
        base_dir = materialize(entry, settings)
        base, _, cases = _score(
            settings, storage, tenant, entry, base_dir, None, rows, entry.max_seq_length, plan
        )
    generated = corpus_scores(base.replies, [case.reference for case in cases])
    return {
        "task": DEFAULT_METHOD,
        "validation_source": rows.source,
        "n_examples": len(rows.groups),
        "n_tokens": base.tokens["n_tokens"],
        "base": _metrics(base.tokens, generated),
        "fine_tuned": None,
        "verdict": None,
        "base_from_cache": base.from_cache,
        "generation": _generation_settings(cases) | {"prompt_limit": plan.describe()} if generated else None,
    }


def _catalog_entry(settings: Settings, model: str) -> Any:
    entry = load_catalog(settings).get(model)
    if entry is None:
        raise JobFailure("model_not_found", f"model {model!r} is no longer in the catalog", "model")
    return entry


def _score(
    settings: Settings,
    storage: Storage,
    tenant: str,
    entry: Any,
    tokenizer_dir: Path,
    adapter_dir: Path | None,
    rows: ValidationRows,
    max_length: int,
    plan: GenerationPlan,
    watch: CancelWatch | None = None,
) -> tuple[ModelScores, ModelScores | None, list[GenerationCase]]:
    """The base model's scores (cached, or computed and then cached), then (with an adapter) the
    fine-tuned model's, on the same rows."""
    base_dir = materialize(entry, settings)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    trust = settings.allow_trust_remote_code
    device = default_device()
    dtype = weights_dtype(device)
    cases = generation_cases(rows.conversations, plan.rows)
    cache = BaseCache(
        storage,
        tenant,
        {
            "cache_version": CACHE_VERSION,
            "model": {"id": entry.id, "source": entry.source, "files": model_fingerprint(base_dir)},
            "tokenizer": tokenizer_fingerprint(tokenizer, tokenizer_dir),
            "rows": rows_digest(rows.conversations, rows.groups),
            "max_seq_length": max_length,
            "token_metrics": {"batch_size": EVAL_BATCH_SIZE},
            "generation": {
                "prompts": len(cases), "decoding": "greedy", "rule": NEW_TOKEN_RULE,
                "batch_size": GENERATION_BATCH_SIZE,
            },
            "runtime": {
                "device": device.type, "dtype": str(dtype), "trust_remote_code": trust,
                "torch": torch.__version__, "transformers": transformers.__version__,
            },
        },
    )  # fmt: skip
    base = cache.load(sorted(group_members(rows.groups)), len(cases))
    _tell(watch, _plan_event(plan, cases, base is not None))
    if base is not None and adapter_dir is None:
        return base, None, cases
    model = load_causal_lm(base_dir, trust_remote_code=trust, dtype=dtype).to(device)
    eos_ids = generation_eos_ids(base_dir, tokenizer, trust_remote_code=trust)
    examples = [tokenize_chat(tokenizer, m, max_length, eos_token_ids=eos_ids) for m in rows.conversations]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def score(m: torch.nn.Module) -> ModelScores:
        tokens, by_group = _token_metrics(m, examples, rows.groups, pad_id)
        replies = generate_replies(
            m, tokenizer, cases, eos_token_ids=eos_ids, pad_token_id=pad_id,
            max_prompt_tokens=max_length, batch_size=GENERATION_BATCH_SIZE,
        )  # fmt: skip
        return ModelScores(tokens, by_group, replies)

    with watching(watch, model), small_model_threads(model):
        if base is None and adapter_dir is not None and _side_by_side(model):
            # The base in a forked child (its copy of the model untouched) while this process scores the
            # tuned model: each holds one CPU, and the first evaluation on new data takes half the time.
            with ForkedCall(lambda: score(model)) as base_call:
                tuned = score(_with_adapter(model, adapter_dir))
                base = base_call.result()
            cache.store(base)
            return base, tuned, cases
        if base is None:
            base = score(model)
            cache.store(base)
        # The adapter is injected into `model` in place: the base is scored first, without a second copy.
        tuned = score(_with_adapter(model, adapter_dir)) if adapter_dir is not None else None
    return base, tuned, cases


def _side_by_side(model: torch.nn.Module) -> bool:
    """Whether the base and the tuned model are scored in two processes at once: when the model runs on
    one thread (small, on CPU) and the process may use another CPU, which would otherwise sit idle."""
    return runs_on_one_thread(model) and usable_cpus() >= 2


def _with_adapter(model: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
    """`model` with the adapter, merged into its weights when they are float32: the same model to within
    float32 rounding, as an export serves it, and a decode step without the adapter's extra modules (the
    quickstart's replies: 0.63 s against 0.84 s). Lower-precision weights keep the adapter beside them:
    merged, a small update below their rounding step would be lost."""
    tuned = PeftModel.from_pretrained(model, adapter_dir)
    return tuned.merge_and_unload() if next(model.parameters()).dtype == torch.float32 else tuned


def _plan_event(plan: GenerationPlan, cases: Sequence[GenerationCase], cached: bool) -> str:
    base = "the base model's results from the cache" if cached else "the base model scored afresh"
    if not cases:
        return f"Evaluation: no replies generated ({plan.describe()}); {base}"
    return (
        f"Evaluation: greedy replies to {len(cases)} validation prompts per model, {plan.describe()}; "
        f"{NEW_TOKEN_RULE}; {base}"
    )


def _tell(watch: CancelWatch | None, message: str) -> None:
    """An event on the job being evaluated (only a job's own evaluation has a watch)."""
    if watch is not None:
        watch.jobs.add_event(watch.job_id, message)


def _token_metrics(
    model: torch.nn.Module, examples: Sequence[TokenizedExample], groups: Sequence[str | None], pad_id: int
) -> tuple[dict[str, float], dict[str, dict[str, float] | None]]:
    """Loss, perplexity and token accuracy overall and per group, in one pass over the rows: each group
    (and the rows without one) is scored alone, and the overall figures pooled from those exactly."""
    members = group_members(groups)
    parts = [*members.values(), [i for i, group in enumerate(groups) if group is None]]
    scored = []
    for rows in parts:
        subset = [examples[i] for i in rows]
        trainable = sum(example.n_trainable for example in subset) > 0
        batches = iter_batches(subset, EVAL_BATCH_SIZE, pad_id)
        scored.append(evaluate_causal_lm(model, batches) if trainable else None)
    overall = pool_token_metrics(part for part in scored if part is not None)
    return overall, dict(zip(members, scored[:-1], strict=True))


def generation_records(
    cases: Sequence[GenerationCase], groups: Sequence[str | None], base: Sequence[str], tuned: Sequence[str]
) -> list[dict[str, Any]]:
    """The lines of the generations artifact: each prompt, its reference, both replies and their scores."""
    return [
        {
            "index": case.index,
            "group": groups[case.index],
            "prompt": case.prompt,
            "reference": case.reference,
            "base": base[k],
            "fine_tuned": tuned[k],
            "base_scores": row_scores(base[k], case.reference),
            "fine_tuned_scores": row_scores(tuned[k], case.reference),
        }
        for k, case in enumerate(cases)
    ]


def build_report(
    source: str,
    groups: Sequence[str | None],
    cases: Sequence[GenerationCase],
    base: ModelScores,
    tuned: ModelScores,
    *,
    group_field: str | None = DEFAULT_GROUP_FIELD,
) -> dict[str, Any]:
    """The evaluation report.

    {validation_source, n_examples, n_tokens, base and fine_tuned {loss, perplexity, mean_token_accuracy,
    exact_match, rouge_l, bleu, chrf (None without generation)}, verdict (improved, unchanged or
    regressed, by the loss), loss_change, loss_relative_change, base_from_cache (the base side was read
    from the base-results cache), generation {n_examples, decoding, max_new_tokens (the cap), new_tokens
    (the rule bounding each reply), main_metric, main_metric_change} or None, verdict_summary (the numbers
    behind the verdict in one line), by_group (None unless some row has a group)}.
    """
    references = [case.reference for case in cases]
    base_generated = corpus_scores(base.replies, references)
    tuned_generated = corpus_scores(tuned.replies, references)
    change = tuned.tokens["loss"] - base.tokens["loss"]
    verdict = (
        "improved" if change < -LOSS_TOLERANCE else "regressed" if change > LOSS_TOLERANCE else "unchanged"
    )
    report: dict[str, Any] = {
        "validation_source": source,
        "n_examples": len(groups),
        "n_tokens": base.tokens["n_tokens"],
        "base": _metrics(base.tokens, base_generated),
        "fine_tuned": _metrics(tuned.tokens, tuned_generated),
        "verdict": verdict,
        "loss_change": change,
        "loss_relative_change": change / base.tokens["loss"] if base.tokens["loss"] else None,
        "generation": None,
        "base_from_cache": base.from_cache,
    }
    if base_generated and tuned_generated:
        report["generation"] = _generation_settings(cases) | {
            "main_metric": MAIN_METRIC,
            "main_metric_change": tuned_generated[MAIN_METRIC] - base_generated[MAIN_METRIC],
        }
    report["verdict_summary"] = verdict_summary(report)
    report["by_group"] = _by_group(groups, cases, base, tuned, group_field)
    return report


def _generation_settings(cases: Sequence[GenerationCase]) -> dict[str, Any]:
    return {
        "n_examples": len(cases),
        "decoding": "greedy",
        "max_new_tokens": MAX_NEW_TOKENS,
        "new_tokens": NEW_TOKEN_RULE,
    }


def verdict_summary(report: dict[str, Any]) -> str:
    """One line of the numbers behind the verdict: the loss change, absolute and relative, and the main
    generation metric's change."""
    base, tuned = report["base"], report["fine_tuned"]
    relative = report.get("loss_relative_change")
    line = f"loss {base['loss']:.4f} → {tuned['loss']:.4f} ({report['loss_change']:+.4f}"
    line += f", {relative:+.1%})" if relative is not None else ")"
    generation = report.get("generation")
    if generation:
        key = generation["main_metric"]
        line += (
            f"; {METRIC_NAMES[key]} {base[key]:.2f} → {tuned[key]:.2f} ({generation['main_metric_change']:+.2f}) "
            f"on {generation['n_examples']} generated replies"
        )
    return line


def _metrics(tokens: dict[str, float] | None, generated: dict[str, float] | None) -> dict[str, float | None]:
    out: dict[str, float | None] = {key: tokens[key] if tokens else None for key in TOKEN_METRICS}
    return out | {key: generated[key] if generated else None for key in GENERATION_METRICS}


def _by_group(
    groups: Sequence[str | None],
    cases: Sequence[GenerationCase],
    base: ModelScores,
    tuned: ModelScores,
    group_field: str | None,
) -> dict[str, Any] | None:
    """{field, n_without_group, groups {value: {n_examples, n_tokens, n_generated, base, fine_tuned}},
    gaps {base, fine_tuned: {metric: {gap, best_group, worst_group}}}, gap_change {metric: fine-tuned gap
    minus base gap, > 0 when fine-tuning widened it}}."""
    members = group_members(groups)
    if not members:
        return None
    per_group: dict[str, dict[str, Any]] = {}
    for group in members:
        picked = [k for k, case in enumerate(cases) if groups[case.index] == group]
        references = [cases[k].reference for k in picked]
        tokens = base.tokens_by_group.get(group)
        per_group[group] = {
            "n_examples": len(members[group]),
            "n_tokens": tokens["n_tokens"] if tokens else 0,
            "n_generated": len(picked),
            **{
                name: _metrics(
                    scores.tokens_by_group.get(group),
                    corpus_scores([scores.replies[k] for k in picked], references),
                )
                for name, scores in (("base", base), ("fine_tuned", tuned))
            },
        }
    gaps = {
        name: {
            metric: largest_gap(
                {group: values[name] for group, values in per_group.items()},
                metric,
                higher_is_better=metric not in LOWER_IS_BETTER,
            )
            for metric in (*TOKEN_METRICS, *GENERATION_METRICS)
        }
        for name in ("base", "fine_tuned")
    }
    gap_change = {
        metric: gaps["fine_tuned"][metric]["gap"] - gaps["base"][metric]["gap"]
        for metric in gaps["base"]
        if gaps["base"][metric] and gaps["fine_tuned"][metric]
    }
    return {
        "field": group_field,
        "n_without_group": sum(group is None for group in groups),
        "groups": per_group,
        "gaps": gaps,
        "gap_change": gap_change,
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
    jobs.add_event(
        record.id,
        f"Evaluation complete on {report['n_examples']} {report['validation_source']} rows: "
        f"{report['verdict']}; {report['verdict_summary']}",
        data=report,
    )
    model_id = fine_tuned_model_id(record)

    def finish(job: JobRecord) -> None:
        job.fine_tuned_model = model_id
        job.evaluation = report
        job.artifacts["evaluation"] = report_key
        job.artifacts["model_card"] = card_key
        if report.get("generation"):
            job.artifacts["generations"] = storage_keys.generations_key(record.tenant, record.id)

    done = jobs.transition(
        record.id,
        JobState.SUCCEEDED,
        f"Job succeeded: {model_id}",
        expected_attempt=record.attempt,
        mutate=finish,
    )
    jobs.register_fine_tuned_model(done)
    if done.hub_repo:
        _publish_to_hub(jobs, storage, settings, done)


def _publish_to_hub(jobs: JobStore, storage: Storage, settings: Settings, record: JobRecord) -> None:
    """Best effort, after success: the artifacts stay in storage whatever happens to the push."""
    try:
        url = push_to_hub(settings, storage, record)
    except Exception as exc:
        log.warning("pushing %s to %s failed: %s", record.id, record.hub_repo, exc)
        jobs.add_event(
            record.id,
            f"Publishing to the Hugging Face Hub repository {record.hub_repo} failed: {exc}",
            level="warn",
        )
        return

    def published(job: JobRecord) -> None:
        job.artifacts["hub"] = url

    jobs.update(record.id, published)
    jobs.add_event(record.id, f"Published to the Hugging Face Hub: {url}")
