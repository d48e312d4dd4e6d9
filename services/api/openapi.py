"""The OpenAPI document says what the API really answers: every error status an operation can give, each
with OpenAI's error object, and never FastAPI's 422 (validation failures are 400s, services/api/errors.py)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

ERROR_REF = "#/components/schemas/Error"
ERROR_SCHEMA = {
    "type": "object",
    "description": "OpenAI's error object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string", "description": "What is wrong, naming the param"},
                "type": {"type": "string", "description": "invalid_request_error, authentication_error, ..."},
                "param": {"type": ["string", "null"], "description": "The request field at fault, if one"},
                "code": {"type": ["string", "null"], "description": "A stable, machine-readable code"},
            },
        }
    },
}

ERROR_DESCRIPTIONS = {
    400: "Invalid request: the message names the problem and `param` the field",
    401: "No API key, or an incorrect or revoked one",
    403: "The API key's role may not do this",
    404: "No such object for the caller's organization",
    409: "An identical request (same Idempotency-Key) is still being processed; retry shortly",
    413: "The request body is larger than the server accepts",
    429: "Rate limit or active-job limit reached; `retry-after` says when to retry",
    503: "Redis, object storage or a worker is unavailable; `retry-after` says when to retry",
}


def install_openapi(app: FastAPI) -> None:
    """Replace FastAPI's document by one with the error responses each operation can give."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                description=app.description,
                routes=app.routes,
            )
            _document_errors(document)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _document_errors(document: dict[str, Any]) -> None:
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas["Error"] = ERROR_SCHEMA
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    for path in document["paths"].values():
        for operation in path.values():
            responses = operation["responses"]
            responses.pop("422", None)
            for status in _error_statuses(operation):
                documented = responses.setdefault(str(status), {"description": ERROR_DESCRIPTIONS[status]})
                documented.setdefault("content", {"application/json": {"schema": {"$ref": ERROR_REF}}})


def _error_statuses(operation: dict[str, Any]) -> list[int]:
    """What an operation can answer besides success, from what it reads and whether it needs a key (403,
    which depends on the key's role, is declared by the routes that check it)."""
    parameters = operation.get("parameters", [])
    body = "requestBody" in operation
    statuses = {int(status) for status in operation["responses"] if status[0] in "45"}
    if operation.get("security"):
        statuses |= {401, 429, 503}  # Redis holds the keys and the rate limits
    if body or parameters:
        statuses.add(400)
    if any(p["in"] == "path" for p in parameters):
        statuses.add(404)
    if body:
        statuses.add(413)
    if any(p["in"] == "header" and p["name"].lower() == "idempotency-key" for p in parameters):
        statuses.add(409)
    return sorted(statuses)
