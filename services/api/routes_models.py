"""/v1/models: the operator's catalog of base models, plus the tenant's fine-tuned models."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from services.api.context import Context, current_tenant, get_context
from services.api.errors import not_found
from services.api.schemas import list_object
from shared.catalog import CatalogEntry

router = APIRouter(prefix="/v1/models", tags=["models"])

# Catalog models exist from server start; OpenAI's Model object needs some creation time.
CATALOG_CREATED_AT = 0


def _catalog_model(entry: CatalogEntry) -> dict:
    return {
        "id": entry.id,
        "object": "model",
        "created": CATALOG_CREATED_AT,
        "owned_by": entry.owned_by,
        # Tunery extras
        "description": entry.description,
        "license": entry.license,
        "max_seq_length": entry.max_seq_length,
        "fine_tuned": False,
    }


def _fine_tuned_model(model_id: str, created: int, tenant: str, job_id: str) -> dict:
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": tenant,
        "fine_tuned": True,
        "fine_tuning_job": job_id,
    }


@router.get("", summary="List models")
def list_models(ctx: Context = Depends(get_context), tenant: str = Depends(current_tenant)) -> dict:
    data = [_catalog_model(entry) for entry in ctx.catalog.values()]
    data += [
        _fine_tuned_model(model_id, created, tenant, job_id)
        for model_id, job_id, created in ctx.jobs.fine_tuned_models(tenant)
    ]
    return list_object(data, False)


@router.get("/{model_id:path}", summary="Retrieve a model")
def retrieve_model(
    model_id: str, ctx: Context = Depends(get_context), tenant: str = Depends(current_tenant)
) -> dict:
    if model_id in ctx.catalog:
        return _catalog_model(ctx.catalog[model_id])
    for fine_tuned, job_id, created in ctx.jobs.fine_tuned_models(tenant):
        if fine_tuned == model_id:
            return _fine_tuned_model(model_id, created, tenant, job_id)
    raise not_found("model", model_id, param="model")
