"""/v1/models: the operator's catalog of base models, plus the tenant's fine-tuned models."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from services.api.auth import Caller, caller_tenant, require_admin
from services.api.context import Context, get_context
from services.api.errors import APIError, not_found
from services.api.schemas import Deleted, Model, ModelList, list_object
from shared.planning.catalog import CatalogEntry
from shared.platform import storage_keys

router = APIRouter(prefix="/v1/models", tags=["models"])

# Catalog models exist from server start; OpenAI's Model object needs some creation time.
CATALOG_CREATED_AT = 0


def _catalog_model(entry: CatalogEntry) -> dict:
    return {
        "id": entry.id,
        "object": "model",
        "created": CATALOG_CREATED_AT,
        "owned_by": entry.owned_by,
        "shutdown_date": None,
        # Tunery extras
        "description": entry.description,
        "license": entry.license,
        "max_seq_length": entry.max_seq_length,
        "tasks": list(entry.tasks),  # the method.type values a job may train it for
        "fine_tuned": False,
    }


def _fine_tuned_model(model_id: str, created: int, tenant: str, job_id: str) -> dict:
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": tenant,
        "shutdown_date": None,
        "fine_tuned": True,
        "fine_tuning_job": job_id,
    }


@router.get("", summary="List models", response_model=ModelList)
def list_models(ctx: Context = Depends(get_context), tenant: str = Depends(caller_tenant)) -> dict:
    data = [_catalog_model(entry) for entry in ctx.catalog.values()]
    data += [
        _fine_tuned_model(model_id, created, tenant, job_id)
        for model_id, job_id, created in ctx.jobs.fine_tuned_models(tenant)
    ]
    return list_object(data, False)


@router.get("/{model_id:path}", summary="Retrieve a model", response_model=Model)
def retrieve_model(
    model_id: str, ctx: Context = Depends(get_context), tenant: str = Depends(caller_tenant)
) -> dict:
    if model_id in ctx.catalog:
        return _catalog_model(ctx.catalog[model_id])
    for fine_tuned, job_id, created in ctx.jobs.fine_tuned_models(tenant):
        if fine_tuned == model_id:
            return _fine_tuned_model(model_id, created, tenant, job_id)
    raise not_found("model", model_id, param="model")


@router.delete(
    "/{model_id:path}",
    summary="Delete a fine-tuned model (admin keys only)",
    response_model=Deleted,
    responses={403: {"description": "The API key is not an admin key"}},
    description="Removes the model from the list and deletes its weights (adapter, or a classifier's model and "
    "labels) and tokenizer; the job stays.",
)
def delete_model(
    model_id: str,
    ctx: Context = Depends(get_context),
    caller: Caller = Depends(require_admin),
) -> dict:
    if model_id in ctx.catalog:
        raise APIError(
            400,
            f"{model_id} is a base model of the operator's catalog; only fine-tuned models can be deleted",
            code="model_not_deletable",
            param="model",
        )
    for fine_tuned, job_id, _ in ctx.jobs.fine_tuned_models(caller.tenant):
        if fine_tuned == model_id:
            ctx.jobs.unregister_fine_tuned_model(caller.tenant, model_id, job_id)
            ctx.storage.delete_prefix(storage_keys.adapter_prefix(caller.tenant, job_id))
            ctx.storage.delete_prefix(storage_keys.tokenizer_prefix(caller.tenant, job_id))
            ctx.storage.delete_prefix(storage_keys.model_prefix(caller.tenant, job_id))
            ctx.storage.delete(storage_keys.labels_key(caller.tenant, job_id))
            ctx.jobs.add_event(job_id, f"Fine-tuned model {model_id} deleted", level="warn")
            return {"id": model_id, "object": "model", "deleted": True}
    raise not_found("model", model_id, param="model")
