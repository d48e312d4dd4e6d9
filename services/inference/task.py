"""Smoke-test inference: chat completions and classifications from catalog and fine-tuned models.

The tasks run in `tunery inference`, an RQ worker that does not fork: a task runs in the worker's own
process, so a model loaded for one request is still in memory for the next (a small LRU of
TUNERY_INFERENCE_CACHE_SIZE models). The API has already checked that the caller's organization owns the
model and that it suits the task; here a model id becomes weights: a catalog model, a fine-tuned one
(the catalog base model plus the job's LoRA adapter, or the job's full weights) downloaded from storage, or
a chat job's checkpoint (the base model plus the adapter as it was at that step: the final adapter, or the
trainable weights a periodic full-state checkpoint holds).

Each task answers a dict: its result, or `{"error": {"status", "code", "message", "param"}}` for a request
the model cannot answer, which the API returns as it is.
"""

from __future__ import annotations

import gc
import logging
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from safetensors.torch import load_file
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from shared.ml.chat_data import ChatTemplateError, render_generation_prompt
from shared.ml.classification_data import (
    TokenizedClassification,
    collate_classification,
    load_sequence_classifier,
    pad_token_id,
    read_labels,
)
from shared.ml.materialize import materialize
from shared.ml.model_loading import default_device, generation_eos_ids, load_causal_lm, weights_dtype
from shared.planning.catalog import CatalogEntry, load_catalog
from shared.platform import metrics
from shared.platform.failures import ModelUnavailable
from shared.platform.records import JobRecord
from shared.platform.runtime import connect
from shared.platform.settings import Settings, get_settings
from shared.platform.storage import Storage, StorageError

log = logging.getLogger(__name__)

CLASSIFY_BATCH_SIZE = 16
DEFAULT_CLASSIFIER_MAX_LENGTH = 512  # when labels.json and the catalog say nothing
STATE_WEIGHTS = "model.safetensors"  # a full-state checkpoint's trainable weights (accelerate's name)

T = TypeVar("T")


class InferenceError(Exception):
    """A request this model cannot answer (the API returns it with `status`)."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param


@dataclass
class ChatModel:
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    eos_ids: set[int]  # the ids generation stops on (the model's generation_config)
    max_seq_length: int  # prompt and reply together (the catalog's max_seq_length)
    device: torch.device


@dataclass
class Classifier:
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    labels: list[str]  # class id i is labels[i]
    pad_id: int  # what training padded with (decoder classifiers read the last non-pad token)
    max_seq_length: int  # texts are truncated to this many tokens, as in training
    device: torch.device


class ModelCache:
    """The models loaded in this process, by model id; beyond `capacity` the least recently used goes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.loads = 0  # how many times a model had to be loaded (cache misses)
        self._models: OrderedDict[str, Any] = OrderedDict()

    def __contains__(self, key: str) -> bool:
        return key in self._models

    def get(self, key: str, load: Callable[[], T]) -> T:
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        # Evict first: a model's memory is freed before the next one is loaded beside it.
        while len(self._models) >= self.capacity:
            evicted, _ = self._models.popitem(last=False)
            log.info("unloading %s (cache of %d models)", evicted, self.capacity)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        model = load()
        self._models[key] = model
        self.loads += 1
        return model


_cache: ModelCache | None = None


def default_cache(settings: Settings) -> ModelCache:
    """The worker process's cache (created on first use, sized by TUNERY_INFERENCE_CACHE_SIZE)."""
    global _cache
    if _cache is None:
        _cache = ModelCache(settings.inference_cache_size)
    return _cache


# -- RQ entry points ------------------------------------------------------------------------------------


def chat_completion(
    spec: dict[str, Any], settings: Settings | None = None, cache: ModelCache | None = None
) -> dict[str, Any]:
    """RQ entry point for POST /v1/chat/completions. `spec`: tenant, model, job_id (None for a catalog
    model), messages, max_tokens, temperature, top_p, seed, stop. Answers content, finish_reason,
    prompt_tokens and completion_tokens."""
    return _serve("chat", spec, settings, cache, _answer_chat)


def classify(
    spec: dict[str, Any], settings: Settings | None = None, cache: ModelCache | None = None
) -> dict[str, Any]:
    """RQ entry point for POST /v1/classifications. `spec`: tenant, model, job_id, input (texts). Answers
    `data` (index, label, score, scores per label) and prompt_tokens."""
    return _serve("classification", spec, settings, cache, _answer_classification)


def _serve(
    task: str,
    spec: dict[str, Any],
    settings: Settings | None,
    cache: ModelCache | None,
    answer: Callable[[Settings, ModelCache, dict[str, Any]], dict[str, Any]],
) -> dict[str, Any]:
    settings = settings or get_settings()
    cache = cache or default_cache(settings)
    started = time.perf_counter()
    try:
        result = answer(settings, cache, spec)
    except InferenceError as exc:
        metrics.TASKS_FINISHED.labels("inference", "rejected").inc()
        return _error(exc.status, exc.code, exc.message, exc.param)
    except ModelUnavailable as exc:
        metrics.TASKS_FINISHED.labels("inference", "rejected").inc()
        return _error(503, "model_unavailable", str(exc), "model")
    except Exception:
        metrics.TASKS_FINISHED.labels("inference", "failed").inc()
        raise
    finally:
        metrics.INFERENCE_SECONDS.labels(task).observe(time.perf_counter() - started)
    metrics.TASKS_FINISHED.labels("inference", "succeeded").inc()
    return result


def _error(status: int, code: str, message: str, param: str | None) -> dict[str, Any]:
    return {"error": {"status": status, "code": code, "message": message, "param": param}}


# -- chat -----------------------------------------------------------------------------------------------


def _answer_chat(settings: Settings, cache: ModelCache, spec: dict[str, Any]) -> dict[str, Any]:
    # A checkpoint is cached by its id: two attempts may each list a checkpoint of the same step (name).
    chat = cache.get(spec.get("checkpoint_id") or spec["model"], lambda: _load_chat_model(settings, spec))
    result = generate(
        chat,
        spec["messages"],
        max_tokens=spec["max_tokens"],
        temperature=spec.get("temperature", 1.0),
        top_p=spec.get("top_p", 1.0),
        seed=spec.get("seed"),
        stop=spec.get("stop") or [],
    )
    metrics.GENERATED_TOKENS.inc(result["completion_tokens"])
    return result


def generate(
    chat: ChatModel,
    messages: list[dict[str, Any]],
    *,
    max_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: list[str] | None = None,
) -> dict[str, Any]:
    """One reply to `messages`, rendered with the model's own chat template. Temperature 0 is greedy
    decoding; OpenAI's sampling semantics otherwise (no top-k, no repetition penalty, whatever the model's
    generation_config suggests). The reply ends at an EOS the model generates, at the first `stop` string
    (not included), or after `max_tokens` tokens or the end of the model's context ("length")."""
    tokenizer = chat.tokenizer
    try:
        prompt = render_generation_prompt(tokenizer, messages)
    except ChatTemplateError as exc:
        raise InferenceError(400, "unsupported_chat_template", str(exc), "model") from exc
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    room = chat.max_seq_length - len(prompt_ids)
    if room <= 0:
        raise InferenceError(
            400, "context_length_exceeded",
            f"messages: the conversation takes {len(prompt_ids)} tokens, and the model reads at most "
            f"{chat.max_seq_length} (prompt and reply together); shorten the messages",
            "messages",
        )  # fmt: skip
    sampling = temperature > 0
    config = GenerationConfig(
        max_new_tokens=min(max_tokens, room),
        do_sample=sampling,
        num_beams=1,
        temperature=temperature if sampling else 1.0,
        top_p=top_p if sampling else 1.0,
        top_k=0,
        repetition_penalty=1.0,
        eos_token_id=sorted(chat.eos_ids),
        pad_token_id=pad_token_id(tokenizer),
    )
    if seed is not None:
        torch.manual_seed(seed)
    input_ids = torch.tensor([prompt_ids], device=chat.device)
    criteria = StoppingCriteriaList([StopStrings(tokenizer, len(prompt_ids), stop)] if stop else [])
    with torch.inference_mode():
        output = chat.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            generation_config=config,
            stopping_criteria=criteria,
        )
    new_ids = output[0, len(prompt_ids) :].tolist()
    finish_reason = "stop" if new_ids and new_ids[-1] in chat.eos_ids else "length"
    content = tokenizer.decode(new_ids, skip_special_tokens=True)
    cuts = [content.find(s) for s in stop or [] if s in content]
    if cuts:
        content, finish_reason = content[: min(cuts)], "stop"
    return {
        "content": content,
        "finish_reason": finish_reason,
        "prompt_tokens": len(prompt_ids),
        "completion_tokens": len(new_ids),
    }


class StopStrings(StoppingCriteria):
    """Stops generation once the decoded reply contains one of `stops` (the reply is cut there after)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_length: int, stops: list[str]) -> None:
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.stops = stops

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
    ) -> torch.BoolTensor:
        text = self.tokenizer.decode(input_ids[0, self.prompt_length :], skip_special_tokens=True)
        done = any(s in text for s in self.stops)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def _load_chat_model(settings: Settings, spec: dict[str, Any]) -> ChatModel:
    entry, record, storage, checkpoint = _resolve(settings, spec)
    if entry is None:
        raise ModelUnavailable(f"model {spec['model']!r}: its base model is no longer in the catalog")
    trust = settings.allow_trust_remote_code
    device = default_device()
    log.info("loading chat model %s", spec["model"])
    with tempfile.TemporaryDirectory(prefix="tunery-inference-") as tmp:
        full_weights = checkpoint is None and record is not None and "model" in record.artifacts
        weights_dir = (
            _download(storage, record, "model", Path(tmp)) if full_weights else materialize(entry, settings)
        )
        # A checkpoint takes the base model's tokenizer: a job still training has saved none (the trainer
        # saves the base's unchanged).
        own_tokenizer = record is not None and checkpoint is None
        tokenizer_dir = _download(storage, record, "tokenizer", Path(tmp)) if own_tokenizer else weights_dir
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=trust)
        model = load_causal_lm(weights_dir, trust_remote_code=trust, dtype=weights_dtype(device))
        if checkpoint is not None and "state_prefix" in checkpoint:
            model = _with_checkpoint_state(model, storage, record, checkpoint, Path(tmp))
        elif checkpoint is not None:
            model = PeftModel.from_pretrained(
                model, _download(storage, record, "adapter", Path(tmp), checkpoint.get("adapter"))
            )
        elif record is not None and not full_weights:
            model = PeftModel.from_pretrained(model, _download(storage, record, "adapter", Path(tmp)))
        eos_ids = generation_eos_ids(weights_dir, tokenizer, trust_remote_code=trust)
    metrics.MODEL_LOADS.labels("chat").inc()
    return ChatModel(model.to(device).eval(), tokenizer, eos_ids, entry.max_seq_length, device)


# -- classification -------------------------------------------------------------------------------------


def _answer_classification(settings: Settings, cache: ModelCache, spec: dict[str, Any]) -> dict[str, Any]:
    classifier = cache.get(spec["model"], lambda: _load_classifier(settings, spec))
    return classify_texts(classifier, spec["input"])


def classify_texts(classifier: Classifier, texts: list[str]) -> dict[str, Any]:
    """The most probable label of each text, its probability, and every label's. Texts are tokenized as
    in training (the tokenizer's special tokens, truncated to the training length) and padded the same."""
    tokenizer = classifier.tokenizer
    rows = []
    for i, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=True, truncation=True, max_length=classifier.max_seq_length)
        if not ids["input_ids"]:
            raise InferenceError(400, "invalid_input", f"input[{i}]: the text holds no tokens", f"input[{i}]")
        rows.append(TokenizedClassification(list(ids["input_ids"]), label=0, group=None, truncated=False))
    data = []
    for start in range(0, len(rows), CLASSIFY_BATCH_SIZE):
        batch = collate_classification(rows[start : start + CLASSIFY_BATCH_SIZE], classifier.pad_id)
        with torch.inference_mode():
            logits = classifier.model(
                input_ids=batch["input_ids"].to(classifier.device),
                attention_mask=batch["attention_mask"].to(classifier.device),
            ).logits
        for offset, probabilities in enumerate(logits.float().softmax(dim=-1).tolist()):
            best = max(range(len(probabilities)), key=probabilities.__getitem__)
            data.append(
                {
                    "index": start + offset,
                    "label": classifier.labels[best],
                    "score": probabilities[best],
                    "scores": dict(zip(classifier.labels, probabilities, strict=True)),
                }
            )
    return {"data": data, "prompt_tokens": sum(len(row.input_ids) for row in rows)}


def _load_classifier(settings: Settings, spec: dict[str, Any]) -> Classifier:
    entry, record, storage, _ = _resolve(settings, spec)
    if record is None or "labels" not in record.artifacts:
        raise InferenceError(
            400, "model_not_classifier",
            f"model: {spec['model']} is not a fine-tuned classifier; classifications need a model trained "
            "with method classification",
            "model",
        )  # fmt: skip
    trust = settings.allow_trust_remote_code
    device = default_device()
    log.info("loading classifier %s", spec["model"])
    with tempfile.TemporaryDirectory(prefix="tunery-inference-") as tmp:
        labels_path = Path(tmp) / "labels.json"
        try:
            storage.download_file(record.artifacts["labels"], labels_path)
        except StorageError as exc:
            raise ModelUnavailable(f"model {spec['model']!r}: its labels could not be read: {exc}") from exc
        saved = read_labels(labels_path)
        tokenizer = AutoTokenizer.from_pretrained(
            _download(storage, record, "tokenizer", Path(tmp)), trust_remote_code=trust
        )
        pad_id = saved.get("pad_token_id")
        pad_id = pad_token_id(tokenizer) if pad_id is None else int(pad_id)
        options = {"pad_token_id": pad_id, "trust_remote_code": trust, "dtype": weights_dtype(device)}
        if "model" in record.artifacts:  # method full: the weights are the whole model
            model_dir = _download(storage, record, "model", Path(tmp))
            model = load_sequence_classifier(model_dir, saved["labels"], model_dir=model_dir, **options)
        else:  # method lora: the base model plus the adapter, which holds the head
            if entry is None:
                raise ModelUnavailable(f"model {spec['model']!r}: its base model is no longer in the catalog")
            adapter_dir = _download(storage, record, "adapter", Path(tmp))
            model = load_sequence_classifier(
                materialize(entry, settings), saved["labels"], adapter_dir=adapter_dir, **options
            )
    max_length = saved.get("max_seq_length") or (
        entry.max_seq_length if entry else DEFAULT_CLASSIFIER_MAX_LENGTH
    )
    metrics.MODEL_LOADS.labels("classification").inc()
    return Classifier(
        model.to(device).eval(), tokenizer, list(saved["labels"]), pad_id, int(max_length), device
    )


# -- resolving a model id -------------------------------------------------------------------------------


def _resolve(
    settings: Settings, spec: dict[str, Any]
) -> tuple[CatalogEntry | None, JobRecord | None, Storage | None, dict[str, Any] | None]:
    """The catalog entry of the model (of its base model, for a fine-tuned one), and for a fine-tuned
    model or checkpoint its job (read again here, owned by the tenant), the storage holding its artifacts
    and the checkpoint as the job lists it (still listed: a pruned one is a 404)."""
    catalog = load_catalog(settings)
    if spec.get("job_id") is None:
        entry = catalog.get(spec["model"])
        if entry is None:
            raise InferenceError(404, "model_not_found", f"No such model: {spec['model']}", "model")
        return entry, None, None, None
    runtime = connect(settings)
    record = runtime.jobs.get(spec["job_id"], spec["tenant"])
    checkpoint = None
    if record is not None and spec.get("checkpoint_id") is not None:
        listed, _ = runtime.jobs.list_checkpoints(record.id, after=None, limit=10_000)
        checkpoint = next(
            (
                c
                for c in listed
                if c["id"] == spec["checkpoint_id"] and c["fine_tuned_model_checkpoint"] == spec["model"]
            ),
            None,
        )
        named = checkpoint is not None
    else:
        named = record is not None and record.fine_tuned_model == spec["model"]
    if record is None or not named:
        raise InferenceError(404, "model_not_found", f"No such model: {spec['model']}", "model")
    return catalog.get(record.model), record, runtime.storage, checkpoint


def _with_checkpoint_state(
    model: torch.nn.Module,
    storage: Storage | None,
    record: JobRecord,
    checkpoint: dict[str, Any],
    workdir: Path,
) -> torch.nn.Module:
    """The base model with the LoRA weights of a full-state checkpoint. Such a checkpoint holds the
    trainable tensors named as in the training PeftModel, not a PEFT adapter folder, so the adapter is
    rebuilt from the job's LoRA settings as the recipes build it and must hold exactly those tensors."""
    name = checkpoint["fine_tuned_model_checkpoint"]
    path = workdir / "checkpoint" / STATE_WEIGHTS
    assert storage is not None  # a job's model always comes with its storage
    try:
        storage.download_file(checkpoint["state_prefix"] + STATE_WEIGHTS, path)
    except StorageError as exc:
        raise ModelUnavailable(
            f"model {name!r}: its checkpoint's weights could not be read (a sharded FSDP or DeepSpeed "
            f"checkpoint cannot be served): {exc}"
        ) from exc
    lora = record.lora
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=lora.target_modules or "all-linear",
    )  # fmt: skip
    model = get_peft_model(model, config)
    saved = load_file(str(path))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(saved) != trainable:
        raise ModelUnavailable(
            f"model {name!r}: the checkpoint holds {len(saved)} trainable tensors, the job's LoRA "
            f"settings make {len(trainable)}"
        )
    model.load_state_dict(saved, strict=False)
    return model


def _download(
    storage: Storage | None, record: JobRecord, artifact: str, workdir: Path, prefix: str | None = None
) -> Path:
    """One artifact folder of a job (adapter, tokenizer, model) into `workdir`; `prefix` (a checkpoint's
    adapter) instead of the job's artifact of that name."""
    prefix = prefix or record.artifacts.get(artifact)
    if storage is None or prefix is None:
        raise ModelUnavailable(f"model {record.fine_tuned_model!r} has no {artifact} among its artifacts")
    directory = workdir / artifact
    try:
        files = storage.download_prefix(prefix, directory)
    except StorageError as exc:
        raise ModelUnavailable(
            f"model {record.fine_tuned_model!r}: its {artifact} could not be read: {exc}"
        ) from exc
    if not files:
        raise ModelUnavailable(f"model {record.fine_tuned_model!r}: its {artifact} is missing from storage")
    return directory
