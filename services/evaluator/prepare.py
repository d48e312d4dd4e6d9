"""Data preparation before a GPU is involved: the `validating_files` stage and the estimate endpoint.

Runs on the evaluator (a CPU worker with transformers), on the `prepare` queue. It tokenizes the
data with the base model's own tokenizer and chat template (the trainer's code), resolves every
"auto" setting with the rules of shared.planning.hyperparams, fails bad data loudly before any training,
and computes the estimate (tokens, steps, memory, duration, cost per GPU class).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from redis import Redis
from transformers import PreTrainedTokenizerBase

from shared.data.splits import holdout_split
from shared.methods import DEFAULT_METHOD, load, method
from shared.ml.chat_data import (
    ChatTemplateError,
    DataError,
    Skipped,
    TokenizedExample,
    check_eos,
    check_trainable,
    cut_away,
    read_chat_examples,
    skipped_note,
    tokenize_chat,
)
from shared.ml.classification_data import is_encoder, label_vocabulary, tokenize_classification
from shared.ml.materialize import materialize
from shared.ml.model_loading import generation_eos_ids
from shared.ml.preference_data import PreferencePair, tokenize_pairs, tokenize_preferences
from shared.ml.task_data import read_rows
from shared.planning import hyperparams
from shared.planning.calibration import calibrated_flops
from shared.planning.catalog import load_catalog
from shared.planning.estimate import DataStats, build_estimate, peak_memory_gib, token_summary
from shared.planning.gpu_classes import load_gpu_classes
from shared.planning.model_facts import read_model_facts
from shared.platform import metrics
from shared.platform.cancel import withdraw_if_cancelled
from shared.platform.failures import JobFailure, classify
from shared.platform.file_store import FileStore
from shared.platform.job_states import IllegalTransition, JobState
from shared.platform.queue import enqueue_training
from shared.platform.records import FileRecord, Hyperparameters, JobRecord, LoraSettings
from shared.platform.redis_connection import connect_redis
from shared.platform.runtime import connect
from shared.platform.settings import Settings, get_settings
from shared.platform.storage import storage_from_settings

log = logging.getLogger(__name__)

UNBOUNDED = 1 << 40  # tokenize whole conversations first: the sequence length is chosen from them


@dataclass
class JobSpec:
    """What planning needs from a job request (a created job or an estimate request)."""

    tenant: str
    model: str
    training_file: str
    validation_file: str | None
    seed: int
    requested: dict[str, Any]
    lora: LoraSettings
    gpu_class: str
    data_policy: str = "warn"
    processes: int = 1  # training processes (devices) in all: num_gpus × num_nodes
    method_type: str = DEFAULT_METHOD
    holdout_seed: int | None = None  # shared.data.splits.holdout_seed; None: `seed` (a job made before it)

    @property
    def split_seed(self) -> int:
        """The seed of the held-out split when the job has no validation file (as JobRecord.split_seed)."""
        return self.seed if self.holdout_seed is None else self.holdout_seed


def plan(settings: Settings, redis: Redis, spec: JobSpec) -> tuple[Hyperparameters, dict[str, Any]]:
    """Resolved hyperparameters and the estimate for `spec`; JobFailure when the data cannot train."""
    from transformers import AutoTokenizer

    entry = load_catalog(settings).get(spec.model)
    if entry is None:
        raise JobFailure("model_not_found", f"model {spec.model!r} is not in the catalog", "model")
    classes = load_gpu_classes(settings.gpu_classes)
    if spec.gpu_class not in classes:
        raise JobFailure(
            "gpu_class_not_found", f"GPU class {spec.gpu_class!r} is not configured", "gpu_class"
        )
    storage = storage_from_settings(settings)
    files = FileStore(redis)
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tunery-prepare-") as tmp:

        def rows_of(file_id: str, param: str) -> list:
            record = files.get(file_id, spec.tenant)
            if record is None:
                raise JobFailure("file_not_found", f"{param} {file_id} does not exist", param)
            found = personal_data_summary(record)
            if found and spec.data_policy == "reject":
                raise JobFailure(
                    "personal_data_found", f"{param} {file_id} holds personal data ({found}); data_policy is reject",
                    param,
                )  # fmt: skip
            if found:
                notes.append(
                    f"{param} {file_id} holds personal data ({found}); data_policy {spec.data_policy}"
                )
            path = Path(tmp) / file_id
            storage.download_file(record.storage_key, path)
            # Examples: where each is in the file names the ones skipped.
            return read_rows(path, record.filename, spec.method_type, redact=spec.data_policy == "redact")

        try:
            rows = rows_of(spec.training_file, "training_file")
        except (DataError, ValueError) as exc:
            raise JobFailure("invalid_training_data", str(exc), "training_file") from exc
        if spec.validation_file:
            train_rows, valid_rows = rows, rows_of(spec.validation_file, "validation_file")
            source = "validation_file"
        else:
            train_rows, valid_rows = holdout_split(rows, spec.split_seed)
            source = "held_out_split"

    model_dir = materialize(entry, settings)
    trust = settings.allow_trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust)
    facts = read_model_facts(model_dir)
    context = min(entry.max_seq_length, facts.max_position_embeddings or entry.max_seq_length)

    def resolve(
        stats: DataStats, encoder: bool = False, length_of: Hyperparameters | None = None
    ) -> Hyperparameters:
        """`length_of`: keep its sequence length and the reason for it (resolving again without the
        examples that length leaves nothing to train on must not choose another length)."""
        requested = spec.requested
        if length_of is not None:
            requested = {**requested, "max_seq_length": length_of.max_seq_length}
        hp = hyperparams.resolve(
            requested, stats, facts=facts, context=context, base_learning_rate=entry.learning_rate,
            lora=spec.lora, gpu_class=classes[spec.gpu_class], seed=spec.seed, processes=spec.processes,
            method_type=spec.method_type, encoder=encoder,
        )  # fmt: skip
        if length_of is not None:
            hp.reasons["max_seq_length"] = length_of.reasons["max_seq_length"]
        return hp

    trained = method(spec.method_type)
    planner: Planner = load(trained.data_kind.planner)
    try:
        hp, stats, skipped = planner(
            tokenizer, model_dir, TaskRows(train_rows, valid_rows, source), resolve, trust, notes
        )
    except ChatTemplateError as exc:
        raise JobFailure("unsupported_chat_template", str(exc), "model") from exc
    except DataError as exc:
        raise JobFailure("invalid_training_data", str(exc), "training_file") from exc
    estimate = build_estimate(
        stats,
        facts,
        hp,
        lora_r=spec.lora.r,
        seed=spec.seed,
        classes=classes,
        calibration=calibrated_flops(redis),
        workload=trained.workload(hp.method),
    )
    if skipped:
        estimate["skipped_examples"] = _skipped_summary(skipped, hp.max_seq_length, notes)
        estimate["train_tokens"]["skipped_examples"] = skipped[0].count
    estimate["notes"] = notes
    return hp, estimate


def _skipped_summary(skipped: list[Skipped], max_seq_length: int, notes: list[str]) -> dict[str, Any]:
    """The estimate's account of the examples left out (one note for all, added to `notes`):
    {max_seq_length, training and validation: {count, of, sources}, warning (the note, or None)}."""
    training, validation = skipped
    warning = skipped_note(skipped)
    if warning:
        notes.append(warning)
    return {
        "max_seq_length": max_seq_length, "training": training.summary(), "validation": validation.summary(),
        "warning": warning,
    }  # fmt: skip


@dataclass
class TaskRows:
    train: list[Any]  # the Examples of the method's data kind
    valid: list[Any]
    source: str  # validation_file or held_out_split

    @property
    def valid_param(self) -> str:
        """The request field a problem of the validation rows is reported against."""
        return "validation_file" if self.source == "validation_file" else "training_file"

    @property
    def valid_name(self) -> str:
        """What messages call the validation rows: held-out rows are named by their training-file places."""
        return "validation" if self.source == "validation_file" else "held-out"


Resolver = Callable[..., Hyperparameters]
# A data kind's planning (its `planner`, shared.methods): the job's rows tokenized with the model's template →
# the resolved hyperparameters, what the estimate counts, and the training and validation rows it skips (none,
# or one Skipped each); problems it has to say go into the notes.
Planner = Callable[
    [PreTrainedTokenizerBase, Path, TaskRows, Resolver, bool, list[str]],
    tuple[Hyperparameters, DataStats, list[Skipped]],
]


def plan_chat(
    tokenizer: PreTrainedTokenizerBase,
    model_dir: Path,
    rows: TaskRows,
    resolve: Resolver,
    trust: bool,
    notes: list[str],
) -> tuple[Hyperparameters, DataStats, list[Skipped]]:
    """Chat conversations rendered with the model's template. Examples the chosen sequence length leaves
    without a token to learn are skipped (a dataset fails when too few are left, `Skipped.check`); the
    estimate counts the examples left, as training does."""
    eos_ids = generation_eos_ids(model_dir, tokenizer, trust_remote_code=trust)
    check_eos(tokenizer, eos_ids)
    train_chats, valid_chats = ([e.messages or [] for e in part] for part in (rows.train, rows.valid))

    def tokenize(chats: list, train_on_inputs: bool = False) -> list[TokenizedExample]:
        return [
            tokenize_chat(tokenizer, m, UNBOUNDED, eos_token_ids=eos_ids, train_on_inputs=train_on_inputs)
            for m in chats
        ]

    train, valid = tokenize(train_chats), tokenize(valid_chats)
    train_lengths, valid_lengths = [len(e.input_ids) for e in train], [len(e.input_ids) for e in valid]
    hp = resolve(DataStats(train_lengths, valid_lengths, rows.source))
    length = hp.max_seq_length

    if hp.train_on_inputs:  # the prompts train too (validation stays on the replies, as in training)
        train = tokenize(train_chats, train_on_inputs=True)
    train_skipped = check_trainable(
        _cut(train, length), train_chats, dataset="training", sources=[e.source for e in rows.train]
    )
    try:
        valid_skipped = check_trainable(
            _cut(valid, length), valid_chats, dataset=rows.valid_name, sources=[e.source for e in rows.valid]
        )
    except DataError as exc:
        raise JobFailure("invalid_training_data", str(exc), rows.valid_param) from exc
    skipped = [train_skipped, valid_skipped]
    if not train_skipped.count and not valid_skipped.count:
        return hp, DataStats(train_lengths, valid_lengths, rows.source), skipped
    # The "auto" rules that count examples (epochs, batch size) count those that train.
    stats = DataStats(train_skipped.keep(train_lengths), valid_skipped.keep(valid_lengths), rows.source)
    return _without_skipped(resolve(stats, length_of=hp), skipped), stats, skipped


def _cut(examples: list[TokenizedExample], length: int) -> list[TokenizedExample]:
    """Whole-conversation examples as `tokenize_chat` cuts them to `length` tokens."""
    return [
        TokenizedExample(e.input_ids[:length], e.labels[:length], len(e.input_ids) > length) for e in examples
    ]


def _without_skipped(hp: Hyperparameters, skipped: list[Skipped]) -> Hyperparameters:
    """`hp` with its sequence length's reason saying what that length leaves out."""
    count = sum(s.count for s in skipped)
    hp.reasons["max_seq_length"] += (
        f"; it leaves {count} {skipped[0].what} nothing to train on, which are skipped"
    )
    return hp


def plan_classification(
    tokenizer: PreTrainedTokenizerBase,
    model_dir: Path,
    rows: TaskRows,
    resolve: Resolver,
    trust: bool,
    notes: list[str],
) -> tuple[Hyperparameters, DataStats, list[Skipped]]:
    """Texts with the model's tokenizer (its special tokens included); the labels come from the training
    rows, and a validation label outside them is refused (the model could never predict it)."""
    from transformers import AutoConfig

    labels = label_vocabulary(rows.train)
    train, _ = tokenize_classification(tokenizer, rows.train, labels, UNBOUNDED)
    try:
        valid, _ = tokenize_classification(tokenizer, rows.valid, labels, UNBOUNDED, dataset="validation")
    except DataError as exc:
        raise JobFailure("invalid_training_data", str(exc), rows.valid_param) from exc
    stats = DataStats(
        train_lengths=[len(e.input_ids) for e in train],
        valid_lengths=[len(e.input_ids) for e in valid],
        validation_source=rows.source,
    )
    encoder = is_encoder(AutoConfig.from_pretrained(model_dir, trust_remote_code=trust))
    return resolve(stats, encoder), stats, []


def plan_preference(
    tokenizer: PreTrainedTokenizerBase,
    model_dir: Path,
    rows: TaskRows,
    resolve: Resolver,
    trust: bool,
    notes: list[str],
) -> tuple[Hyperparameters, DataStats, list[Skipped]]:
    """Both sides of every pair rendered with the model's template. The sequence length (per side) is chosen
    from the longer side of each pair; the estimate counts both sides as training will cut them."""
    eos_ids = generation_eos_ids(model_dir, tokenizer, trust_remote_code=trust)
    check_eos(tokenizer, eos_ids)
    tokenize = partial(tokenize_preferences, tokenizer, eos_token_ids=eos_ids)

    def longer_sides(pairs: list[PreferencePair]) -> list[int]:
        return [max(len(p.chosen.input_ids), len(p.rejected.input_ids)) for p in pairs]

    uncut, _ = tokenize(rows.train, UNBOUNDED)
    try:
        uncut_valid, _ = tokenize(rows.valid, UNBOUNDED, dataset=rows.valid_name)
    except DataError as exc:
        raise JobFailure("invalid_training_data", str(exc), rows.valid_param) from exc
    hp = resolve(DataStats(longer_sides(uncut), longer_sides(uncut_valid), rows.source))
    # Cut as training cuts them: the estimate's token counts are exact, and the same pairs are skipped.
    cut = partial(tokenize_pairs, tokenizer, max_length=hp.max_seq_length, eos_token_ids=eos_ids)
    train = cut(rows.train)
    try:
        valid = cut(rows.valid, dataset=rows.valid_name)
    except DataError as exc:
        raise JobFailure("invalid_training_data", str(exc), rows.valid_param) from exc
    notes += train.warnings + valid.warnings
    skipped = [train.skipped, valid.skipped]
    stats = DataStats([p.n_tokens for p in train.pairs], [p.n_tokens for p in valid.pairs], rows.source)
    if train.skipped.count or valid.skipped.count:
        kept = DataStats(
            train.skipped.keep(longer_sides(uncut)),
            valid.skipped.keep(longer_sides(uncut_valid)),
            rows.source,
        )
        hp = _without_skipped(resolve(kept, length_of=hp), skipped)
    return hp, stats, skipped


def personal_data_summary(record: FileRecord) -> str:
    """e.g. "3 email, 1 credit_card (first at line 4)", or "" when the upload scan found none."""
    found = ((record.report or {}).get("personal_data") or {}).get("counts") or {}
    if not found:
        return ""
    first = (record.report or {})["personal_data"].get("first_seen", {})
    places = [f"{kind} at {first[kind][0]}" for kind in sorted(found) if first.get(kind)]
    counts = ", ".join(f"{n} {kind}" for kind, n in sorted(found.items()))
    return counts + (f"; first: {', '.join(places)}" if places else "")


def _spec_of(record: JobRecord) -> JobSpec:
    return JobSpec(
        method_type=record.method_type,
        tenant=record.tenant,
        model=record.model,
        training_file=record.training_file,
        validation_file=record.validation_file,
        seed=record.seed,
        holdout_seed=record.holdout_seed,
        requested=record.requested_hyperparameters,
        lora=record.lora,
        gpu_class=record.gpu_class,
        data_policy=record.data_policy,
        processes=record.num_gpus * record.num_nodes,
    )


def prepare_job(job_id: str, settings: Settings | None = None) -> str:
    """RQ entry point: validate a created job's files and settings, then queue it for training."""
    runtime = connect(settings)
    settings, redis, jobs = runtime.settings, runtime.redis, runtime.jobs
    record = jobs.get(job_id)
    if record is None or record.state is not JobState.VALIDATING_FILES:
        return f"skipped ({record.state.value if record else 'missing'})"
    try:
        hp, estimate = plan(settings, redis, _spec_of(record))
    except Exception as exc:
        error, expected = classify(exc)
        try:
            jobs.transition(
                job_id, JobState.FAILED, f"Validation failed: {error.message}", level="error", error=error
            )
        except Exception:
            log.exception("could not mark %s failed", job_id)
        metrics.TASKS_FINISHED.labels("prepare", "failed").inc()
        if not expected:
            raise
        return f"failed: {error.code}"
    chosen = estimate["gpu_classes"][record.gpu_class]

    def resolved(job: JobRecord) -> None:
        job.hyperparameters = hp
        job.estimate = estimate

    skipped = estimate.get("skipped_examples") or {}
    for note in estimate["notes"]:
        # The examples left out: counted and named in the message, and in its data for programs.
        data = skipped if note == skipped.get("warning") else None
        jobs.add_event(job_id, note, level="warn", data=data)
    try:
        jobs.transition(
            job_id, JobState.QUEUED,
            f"Validated files: {estimate['train_examples']} training examples, {estimate['trained_tokens']} tokens "
            f"to train, {estimate['optimizer_steps']} steps; about {chosen['duration_seconds']:.0f} s and "
            f"${chosen['cost_usd']:.4f} on {record.gpu_class}. Job queued.",
            mutate=resolved, data={"estimate": estimate},
        )  # fmt: skip
    except IllegalTransition:  # cancelled while its data was being prepared: it never reaches a trainer
        return f"skipped ({jobs.require(job_id).state.value})"
    enqueue_training(
        redis, job_id, record.attempt, record.gpu_class, settings.train_timeout_seconds, record.num_nodes
    )
    if withdraw_if_cancelled(jobs, redis, job_id):  # cancelled between the two
        return "skipped (cancelled)"
    metrics.TASKS_FINISHED.labels("prepare", "queued").inc()
    return "queued"


def estimate_request(spec: dict[str, Any], settings: Settings | None = None) -> dict[str, Any]:
    """RQ entry point for POST /v1/fine_tuning/jobs/estimate: plans without creating anything."""
    settings = settings or get_settings()
    redis = connect_redis(settings.effective_redis_url, settings.redis_outage_seconds)
    job_spec = JobSpec(**{**spec, "lora": LoraSettings(**spec["lora"])})
    try:
        hp, estimate = plan(settings, redis, job_spec)
    except Exception as exc:
        error, _ = classify(exc)
        return {"error": error.model_dump()}
    return {"hyperparameters": hp.model_dump(), "estimate": estimate}


def token_report(spec: dict[str, Any], settings: Settings | None = None) -> dict[str, Any]:
    """RQ entry point for GET /v1/files/{id}/report?model=…: token counts of every row of a chat file
    with that model's tokenizer and template, what a sequence length would truncate, and the rows it would
    leave nothing to train on (which a job skips, or fails on when too few rows are left: `notes` says)."""
    from transformers import AutoTokenizer

    settings = settings or get_settings()
    redis = connect_redis(settings.effective_redis_url, settings.redis_outage_seconds)
    entry = load_catalog(settings).get(spec["model"])
    file = FileStore(redis).get(spec["file_id"], spec["tenant"])
    if entry is None or file is None:
        return {"error": {"code": "not_found", "message": "model or file not found", "param": None}}
    model_dir = materialize(entry, settings)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=settings.allow_trust_remote_code)
    eos_ids = generation_eos_ids(model_dir, tokenizer, trust_remote_code=settings.allow_trust_remote_code)
    with tempfile.TemporaryDirectory(prefix="tunery-report-") as tmp:
        path = Path(tmp) / file.id
        storage_from_settings(settings).download_file(file.storage_key, path)
        try:
            rows = read_chat_examples(path, file.filename)
            chats = [e.messages or [] for e in rows]
            examples = [tokenize_chat(tokenizer, m, UNBOUNDED, eos_token_ids=eos_ids) for m in chats]
        except (DataError, ChatTemplateError) as exc:
            return {"error": {"code": "invalid_training_data", "message": str(exc), "param": "file"}}
    length = spec.get("max_seq_length") or entry.max_seq_length
    tokens = token_summary([len(e.input_ids) for e in examples], length)
    report: dict[str, Any] = {"model": entry.id, "max_seq_length": length, "tokens": tokens, "notes": []}
    # As a job training on every row would see them (its held-out split aside).
    skipped: Skipped | None = None
    try:
        skipped = cut_away(_cut(examples, length), chats, sources=[e.source for e in rows])
        skipped.check()
    except DataError as exc:
        report["notes"].append(f"A job on this file would fail with invalid_training_data: {exc}")
    else:
        if skipped.count:
            report["notes"].append(skipped.warning())
    if skipped is not None:
        tokens["skipped_examples"] = skipped.count
        report["skipped_examples"] = skipped.summary()
    return report


def model_fit(spec: dict[str, Any], settings: Settings | None = None) -> dict[str, Any]:
    """RQ entry point for GET /v1/models/{id}/fit: a catalog model's size and context length, read from its
    files, and whether a LoRA job on it fits each GPU class: the estimate's memory model for one example
    per step at the full context length and the default rank (what any job needs at least)."""
    settings = settings or get_settings()
    entry = load_catalog(settings).get(spec["model"])
    if entry is None:
        return {
            "error": {
                "code": "model_not_found",
                "message": f"{spec['model']} is not in the catalog",
                "param": "model",
            }
        }
    try:
        model_dir = materialize(entry, settings)
    except Exception as exc:
        error, _ = classify(exc)
        return {"error": error.model_dump()}
    facts = read_model_facts(model_dir)
    context = min(entry.max_seq_length, facts.max_position_embeddings or entry.max_seq_length)
    # What a LoRA job of the first method it can learn needs (supervised for causal LMs, classification for
    # encoders).
    workload = method(entry.tasks[0]).workload("lora")
    rank = LoraSettings().r
    classes = {}
    for name, gpu_class in load_gpu_classes(settings.gpu_classes).items():
        memory = peak_memory_gib(facts, 1, context, rank, name != "cpu", workload)
        classes[name] = {
            "memory_gb": gpu_class.memory_gb,
            "peak_memory_gib": round(memory, 2),
            "fits": memory <= gpu_class.memory_gb,
        }
    return {
        "parameters": facts.n_params,
        "context_length": context,
        "micro_batch_size": 1,
        "lora_r": rank,
        "gpu_classes": classes,
    }
