"""The API's two middlewares, as plain ASGI: no per-request task, stream or request object (Starlette's
`@app.middleware("http")` adds all three to every request, the polled job GETs included)."""

from __future__ import annotations

import time

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.api.errors import error_body
from shared.platform import metrics
from shared.platform.settings import Settings

# Room for multipart boundaries and form fields around an upload of the maximum size.
MULTIPART_OVERHEAD = 64 * 1024


class LimitBodySize:
    """Refuse oversized bodies from their Content-Length, before reading a byte of them."""

    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            length = headers.get(b"content-length", b"")
            if length.isdigit():
                multipart = headers.get(b"content-type", b"").startswith(b"multipart/")
                limit = (
                    self.settings.max_upload_bytes + MULTIPART_OVERHEAD
                    if multipart
                    else self.settings.max_json_bytes
                )
                if int(length) > limit:
                    setting = "TUNERY_MAX_UPLOAD_BYTES" if multipart else "TUNERY_MAX_JSON_BYTES"
                    message = f"the request body is larger than {limit} bytes ({setting})"
                    response = JSONResponse(error_body(413, message, "body_too_large", None), status_code=413)
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


class ObserveLatency:
    """Each request's seconds until its response starts, by method, route template and status."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def observing_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = scope.get("route")
                metrics.HTTP_REQUEST_SECONDS.labels(
                    scope["method"], getattr(route, "path", "unmatched"), str(message["status"])
                ).observe(time.perf_counter() - started)
            await send(message)

        await self.app(scope, receive, observing_send)
