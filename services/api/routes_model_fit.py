"""GET /v1/models/{model}/fit: what choosing a catalog model means for hardware, before any data is
chosen (the console's model catalog). Its files hold the facts, and only workers have them, so an
evaluator reads them; the answer is kept per process, as the catalog does not change while it runs."""

from __future__ import annotations

import threading

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from services.api.auth import caller_tenant
from services.api.context import Context, get_context
from services.api.errors import APIError, not_found
from shared.platform.queue import MODEL_FIT_TASK, run_estimate

router = APIRouter(prefix="/v1/models", tags=["models"])

_answers: dict[tuple[str, str, str], dict] = {}
_lock = threading.Lock()


class GpuClassFit(BaseModel):
    memory_gb: float = Field(description="The class's usable memory per device")
    peak_memory_gib: float = Field(description="Estimated peak memory of the job per device")
    fits: bool


class ModelFit(BaseModel):
    object: str = Field(description="model.fit")
    model: str
    parameters: int = Field(description="Parameters, counted from the safetensors headers")
    context_length: int = Field(description="Tokens per example: the catalog's limit within the model's own")
    micro_batch_size: int = Field(description="The examples per step the memory figures assume")
    lora_r: int = Field(description="The LoRA rank the memory figures assume")
    gpu_classes: dict[str, GpuClassFit]


# Declared before GET /v1/models/{model_id:path}, which would otherwise take the whole path as a model id.
@router.get(
    "/{model_id:path}/fit",
    summary="A catalog model's size and whether a job on it fits each GPU class",
    response_model=ModelFit,
    responses={404: {"description": "No such model in the catalog"}},
    description="Its parameters and context length, and the estimated peak memory of a LoRA job on it (one "
    "example per step at the full context length, the default rank; the classification head for an encoder) "
    "against each GPU class's memory. A job's own estimate (POST /v1/fine_tuning/jobs/estimate) accounts "
    "for its data and settings. An evaluator worker reads the model's files.",
)
def model_fit(
    model_id: str, ctx: Context = Depends(get_context), tenant: str = Depends(caller_tenant)
) -> dict:
    if model_id not in ctx.catalog:
        raise not_found("model", model_id, param="model")
    # The answer holds while the model's source and the GPU classes are those it was computed for.
    key = (model_id, ctx.catalog[model_id].source, repr(sorted(ctx.gpu_classes.items())))
    with _lock:
        known = _answers.get(key)
    if known is not None:
        return known
    result = run_estimate(
        ctx.redis, {"model": model_id}, ctx.settings.estimate_timeout_seconds, MODEL_FIT_TASK
    )
    if result is None:
        raise APIError(503, "no evaluator worker answered in time; retry later", code="no_worker")
    if "error" in result:
        raise APIError(400, result["error"]["message"], code=result["error"]["code"], param="model")
    answer = {"object": "model.fit", "model": model_id, **result}
    with _lock:
        _answers[key] = answer
    return answer
