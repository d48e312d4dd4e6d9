"""/v1/usage: what the caller's organization has spent on training."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from services.api.auth import caller_tenant
from services.api.context import Context, get_context
from shared.platform.usage import tenant_usage

router = APIRouter(prefix="/v1/usage", tags=["usage"])


@router.get(
    "",
    summary="Training cost and device-seconds of the caller's organization, in total and per GPU class",
    description="Cost is device-seconds × each GPU class's price per hour (TUNERY_GPU_CLASSES); every device "
    "a job holds counts, and stopped or failed jobs count for what they ran.",
)
def usage(ctx: Context = Depends(get_context), tenant: str = Depends(caller_tenant)) -> dict:
    return {"object": "organization.usage", **tenant_usage(ctx.redis, tenant)}
