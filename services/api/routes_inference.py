"""/v1/chat/completions and /v1/classifications: try a model before exporting it.

Smoke tests, not a serving stack: the API stays stateless and hands each request to an inference worker
(`tunery inference`, which keeps recently used models loaded) through the `inference` queue, then waits
for the answer. A caller may use the catalog's base models (chat), its own organization's fine-tuned
models, and (chat only) the checkpoints its jobs list, by their `fine_tuned_model_checkpoint` name; another
organization's model or checkpoint is a 404, as it is everywhere else.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, Depends

from services.api.auth import caller_tenant
from services.api.context import Context, get_context
from services.api.errors import APIError, not_found
from services.api.schemas import (
    ChatCompletion,
    ChatCompletionCreate,
    ClassificationCreate,
    ClassificationList,
)
from shared.methods import method
from shared.platform.queue import (
    CHAT_COMPLETION_TASK,
    CLASSIFICATION_TASK,
    INFERENCE_QUEUE,
    listening_workers,
    run_inference,
)
from shared.platform.records import now

router = APIRouter(prefix="/v1", tags=["inference"])

Task = Literal["chat", "classification"]

START_A_WORKER = "start one with `tunery inference` (or run `tunery up`, which starts one)"


# OpenAI's checkpoint name: the fine-tuned model's id (ft:<base>:<org>:<suffix>:<job id>) and the step.
CHECKPOINT_NAME = re.compile(r"^ft:.*:(?P<job_id>[^:]+):ckpt-step-\d+$")


@dataclass(frozen=True)
class Target:
    """What the worker is to load: a catalog model (no job), a job's fine-tuned model, or its checkpoint."""

    job_id: str | None = None
    checkpoint_id: str | None = None


def _target(ctx: Context, tenant: str, model_id: str, task: Task) -> Target:
    """The job (and checkpoint) that made `model_id`, checked to belong to `tenant` and to suit `task`."""
    if model_id in ctx.catalog:
        if task == "classification":
            raise APIError(
                400,
                f"model: {model_id} is a base model of the catalog; classifications need a classifier "
                "fine-tuned with method classification",
                code="model_not_classifier", param="model",
            )  # fmt: skip
        return Target()
    job_id = ctx.jobs.job_of_fine_tuned_model(tenant, model_id)
    checkpoint = None if job_id is not None else _checkpoint(ctx, tenant, model_id)
    if checkpoint is not None:
        job_id = checkpoint["fine_tuning_job_id"]
    record = None if job_id is None else ctx.jobs.get(job_id, tenant)
    if record is None:
        raise not_found("model", model_id, param="model")
    is_classifier = method(record.method_type).serves == "classification"
    if checkpoint is not None and (task == "classification" or is_classifier):
        raise APIError(
            400,
            f"model: {model_id} is a checkpoint; only a chat model's checkpoints can be tried, with POST "
            "/v1/chat/completions (a classifier answers from its fine-tuned model)",
            code="checkpoint_not_supported", param="model",
        )  # fmt: skip
    if task == "chat" and is_classifier:
        raise APIError(
            400,
            f"model: {model_id} is a classifier; send its inputs to POST /v1/classifications",
            code="model_not_chat", param="model",
        )  # fmt: skip
    if task == "classification" and not is_classifier:
        raise APIError(
            400,
            f"model: {model_id} is a chat model, not a classifier; use POST /v1/chat/completions",
            code="model_not_classifier", param="model",
        )  # fmt: skip
    return Target(record.id, None if checkpoint is None else checkpoint["id"])


def _checkpoint(ctx: Context, tenant: str, name: str) -> dict[str, Any] | None:
    """The checkpoint listed as `name` by one of the tenant's jobs (the job id is read out of the name,
    the name then matched whole, so another organization's job or a made-up name finds nothing). The
    listing is newest first: a step both saved periodically and as the final adapter is the final one."""
    match = CHECKPOINT_NAME.match(name)
    if match is None or ctx.jobs.get(match["job_id"], tenant) is None:
        return None
    listed, _ = ctx.jobs.list_checkpoints(match["job_id"], after=None, limit=10_000)
    return next((c for c in listed if c["fine_tuned_model_checkpoint"] == name), None)


def _ask_worker(ctx: Context, task_name: str, spec: dict) -> dict:
    """The inference worker's answer, or the error it gave, or 503 when no worker answers in time."""
    if listening_workers(ctx.redis, INFERENCE_QUEUE) == 0:
        raise APIError(
            503, f"No inference worker is running: {START_A_WORKER}, then retry", code="no_inference_worker",
            headers={"retry-after": "10"},
        )  # fmt: skip
    timeout = ctx.settings.inference_timeout_seconds
    result = run_inference(ctx.redis, task_name, spec, timeout)
    if result is None:
        raise APIError(
            503,
            f"No inference worker answered within {timeout:g} s (TUNERY_INFERENCE_TIMEOUT_SECONDS): they may "
            f"be busy or still loading a large model; retry, or {START_A_WORKER}",
            code="no_inference_worker", headers={"retry-after": "10"},
        )  # fmt: skip
    if "error" in result:
        error = result["error"]
        status = error.get("status") or (500 if error["code"] == "internal_error" else 400)
        raise APIError(status, error["message"], code=error["code"], param=error.get("param"))
    return result


@router.post(
    "/chat/completions",
    summary="Create a chat completion (to try a model)",
    responses={404: {"description": "No such model or checkpoint for the caller's organization"}},
    response_model=ChatCompletion,
    description=(
        "OpenAI's chat completion, answered by an inference worker from a fine-tuned model of your "
        "organization (`ft:…`), one of its jobs' checkpoints (the `fine_tuned_model_checkpoint` name that "
        "GET /v1/fine_tuning/jobs/{id}/checkpoints lists, `ft:…:ckpt-step-N`: the adapter as it was at "
        "that step) or a catalog model, with the model's own chat template. `temperature` 0 "
        "decodes greedily; `max_tokens` is at most TUNERY_INFERENCE_MAX_TOKENS. No streaming and one choice. "
        "503 when no inference worker answers within TUNERY_INFERENCE_TIMEOUT_SECONDS."
    ),
)
def create_chat_completion(
    body: ChatCompletionCreate, ctx: Context = Depends(get_context), tenant: str = Depends(caller_tenant)
) -> dict:
    if body.stream:
        raise APIError(
            400, "stream: streaming is not available for smoke-test completions; send stream=false",
            code="streaming_unsupported", param="stream",
        )  # fmt: skip
    limit = ctx.settings.inference_max_tokens
    param, max_tokens = (
        ("max_completion_tokens", body.max_completion_tokens)
        if body.max_completion_tokens is not None
        else ("max_tokens", body.max_tokens)
    )
    if max_tokens is not None and max_tokens > limit:
        raise APIError(
            400, f"{param}: at most {limit} tokens (TUNERY_INFERENCE_MAX_TOKENS)", code="invalid_request",
            param=param,
        )  # fmt: skip
    target = _target(ctx, tenant, body.model, "chat")
    spec = {
        "tenant": tenant,
        "model": body.model,
        "job_id": target.job_id,
        "checkpoint_id": target.checkpoint_id,
        "messages": [message.for_template() for message in body.messages],
        "max_tokens": max_tokens or limit,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "seed": body.seed,
        "stop": body.stop,
    }
    result = _ask_worker(ctx, CHAT_COMPLETION_TASK, spec)
    return {
        "id": f"chatcmpl-{secrets.token_hex(12)}",
        "object": "chat.completion",
        "created": now(),
        "model": body.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result["content"], "refusal": None},
                "finish_reason": result["finish_reason"],
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": result["prompt_tokens"],
            "completion_tokens": result["completion_tokens"],
            "total_tokens": result["prompt_tokens"] + result["completion_tokens"],
        },
    }


@router.post(
    "/classifications",
    summary="Classify texts (to try a classifier)",
    responses={404: {"description": "No such model for the caller's organization"}},
    response_model=ClassificationList,
    description=(
        "The most probable label of each text with its probability (`score`) and every label's (`scores`), "
        "from a classifier fine-tuned by your organization (method classification), answered by an "
        "inference worker. At most TUNERY_INFERENCE_MAX_INPUTS texts; each is truncated to the length the "
        "classifier was trained with."
    ),
)
def create_classifications(
    body: ClassificationCreate, ctx: Context = Depends(get_context), tenant: str = Depends(caller_tenant)
) -> dict:
    texts = body.texts()
    limit = ctx.settings.inference_max_inputs
    if len(texts) > limit:
        raise APIError(
            400, f"input: at most {limit} texts per request (TUNERY_INFERENCE_MAX_INPUTS), not {len(texts)}",
            code="invalid_request", param="input",
        )  # fmt: skip
    target = _target(ctx, tenant, body.model, "classification")
    spec = {"tenant": tenant, "model": body.model, "job_id": target.job_id, "input": texts}
    result = _ask_worker(ctx, CLASSIFICATION_TASK, spec)
    tokens = result["prompt_tokens"]
    return {
        "object": "list",
        "model": body.model,
        "data": result["data"],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
