"""OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}` for every failure."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.platform.job_states import IllegalTransition
from shared.platform.storage import ObjectNotFound, StorageError

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers


def not_found(kind: str, object_id: str, param: str | None = None) -> APIError:
    return APIError(
        404, f"No such {kind}: {object_id}", code=f"{kind.replace(' ', '_')}_not_found", param=param
    )


# The 400 of the operations that read a file, as their OpenAPI responses describe it.
FILE_NOT_READY_RESPONSE = {
    400: {
        "description": "Invalid request: the message names the problem and `param` the field; code "
        "`file_not_ready` when a file it names is still being validated (status `uploaded`): retry once its "
        "status is `processed`"
    }
}


def file_not_ready(file_id: str, param: str | None = None) -> APIError:
    """A file larger than TUNERY_SYNC_VALIDATION_BYTES is validated after its upload's answer; until then
    nothing can use it."""
    return APIError(
        400, f"{file_id} is still being validated (status uploaded); retry when its status is processed "
        f"(GET /v1/files/{file_id})",
        code="file_not_ready", param=param,
    )  # fmt: skip


def error_body(status: int, message: str, code: str | None, param: str | None) -> dict:
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        body = error_body(exc.status, exc.message, exc.code, exc.param)
        return JSONResponse(body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc.errors(), exc.body)
        return JSONResponse(error_body(400, message, "invalid_request", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette lists the methods of the first route matching the path only; a path served by several
            # routes (GET and POST /v1/files) supports all of theirs.
            allowed = _methods_of(app, request.url.path)
            if allowed:
                headers = {k: v for k, v in headers.items() if k.lower() != "allow"} | {
                    "allow": ", ".join(allowed)
                }
        return JSONResponse(
            error_body(exc.status_code, str(exc.detail), None, None),
            status_code=exc.status_code,
            headers=headers,
        )

    @app.exception_handler(IllegalTransition)
    async def illegal_transition(_: Request, exc: IllegalTransition) -> JSONResponse:
        return JSONResponse(error_body(400, str(exc), "invalid_job_state", None), status_code=400)

    @app.exception_handler(RedisError)
    async def redis_unavailable(_: Request, exc: RedisError) -> JSONResponse:
        body = error_body(503, f"the job store is unavailable: {exc}", "redis_unavailable", None)
        return JSONResponse(body, status_code=503, headers={"retry-after": "5"})

    @app.exception_handler(ObjectNotFound)
    async def object_gone(_: Request, exc: ObjectNotFound) -> JSONResponse:
        # The record named an object that is gone: deleted by a concurrent request, answered as it would be now.
        body = error_body(404, f"the object's content no longer exists: {exc}", "object_not_found", None)
        return JSONResponse(body, status_code=404)

    @app.exception_handler(StorageError)
    async def storage_unavailable(_: Request, exc: StorageError) -> JSONResponse:
        body = error_body(503, f"object storage is unavailable: {exc}", "storage_unavailable", None)
        return JSONResponse(body, status_code=503, headers={"retry-after": "5"})


# The segments pydantic adds to an error's location for the member of a union it tried (`constrained-float`,
# `literal['auto']`, `function-after[...]`, ...): not part of the field's name.
_UNION_MEMBER = re.compile(
    r"^(constrained-)?(int|float|str|bool|bytes|list|dict|set|tuple|none|literal|function-\w+|"
    r"tagged-union|union|json-or-python|lax-or-strict|nullable|chain|default|is-instance|enum)(\[.*\])?$"
)
# pydantic prefixes the messages of errors raised in validators ("Value error, must be ...").
_VALIDATOR_PREFIXES = ("Value error, ", "Assertion failed, ")


def validation_message(errors: Sequence[Any], body: Any) -> tuple[str, str | None]:
    """The first problem of a request, as OpenAI words it: a message naming the param, and the param
    (dotted, `[i]` for list items), or a body that is not JSON at all with where it breaks."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        return _json_problem(first, body), None
    param = _param(first.get("loc", ()))
    # A union such as `float | "auto"` reports one error per member: the value's problem, and the
    # literals it could have been instead.
    same = [e for e in errors if _param(e.get("loc", ())) == param]
    literals = [e for e in same if e.get("type") == "literal_error" and "expected" in e.get("ctx", {})]
    main = next((e for e in same if e not in literals), first)
    message = _clean(str(main.get("msg")))
    alternatives = [e["ctx"]["expected"] for e in literals if e is not main]
    if alternatives:
        message += ", or " + " or ".join(alternatives)
    return (f"{param}: {message}" if param else f"request body: {message}"), param


def _param(location: Sequence[Any]) -> str | None:
    path = ""
    for part in (
        location[1:] if location and location[0] in ("body", "query", "path", "form", "header") else location
    ):
        if isinstance(part, int):
            path += f"[{part}]"
        elif not _UNION_MEMBER.match(str(part)):
            path += f".{part}" if path else str(part)
    return path or None


def _clean(message: str) -> str:
    for prefix in _VALIDATOR_PREFIXES:
        message = message.removeprefix(prefix)
    return message


def _json_problem(error: dict[str, Any], body: Any) -> str:
    """`the request body is not valid JSON: Expecting value (line 3, column 5)`."""
    reason = error.get("ctx", {}).get("error", "JSON decode error")
    location = error.get("loc", ())
    position = location[-1] if location and isinstance(location[-1], int) else None
    if position is None or not isinstance(body, str):
        return f"the request body is not valid JSON: {reason}"
    line = body.count("\n", 0, position) + 1
    column = position - body.rfind("\n", 0, position)
    return f"the request body is not valid JSON: {reason} (line {line}, column {column})"


def _methods_of(app: FastAPI, path: str) -> list[str]:
    """The methods the OpenAPI document lists for the path: its own if the path is listed as it is (OpenAPI
    matches concrete paths before templated ones), else those of every template matching it."""
    paths = app.openapi()["paths"]
    if path in paths:
        return sorted(method.upper() for method in paths[path])
    methods: set[str] = set()
    for template, operations in paths.items():
        pattern = re.sub(r"\\{[^}]+\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, path):
            methods |= {method.upper() for method in operations}
    return sorted(methods)
