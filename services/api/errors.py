"""OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}` for every failure."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.job_states import IllegalTransition
from shared.storage import StorageError

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
        first = exc.errors()[0]
        location = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "form")]
        param = ".".join(location) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return JSONResponse(error_body(400, message, "invalid_request", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            error_body(exc.status_code, str(exc.detail), None, None),
            status_code=exc.status_code,
            headers=exc.headers,
        )

    @app.exception_handler(IllegalTransition)
    async def illegal_transition(_: Request, exc: IllegalTransition) -> JSONResponse:
        return JSONResponse(error_body(400, str(exc), "invalid_job_state", None), status_code=400)

    @app.exception_handler(RedisError)
    async def redis_unavailable(_: Request, exc: RedisError) -> JSONResponse:
        body = error_body(503, f"the job store is unavailable: {exc}", "redis_unavailable", None)
        return JSONResponse(body, status_code=503, headers={"retry-after": "5"})

    @app.exception_handler(StorageError)
    async def storage_unavailable(_: Request, exc: StorageError) -> JSONResponse:
        body = error_body(503, f"object storage is unavailable: {exc}", "storage_unavailable", None)
        return JSONResponse(body, status_code=503, headers={"retry-after": "5"})
