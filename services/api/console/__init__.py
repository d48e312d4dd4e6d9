"""The web console and the API docs, served by the API itself from files shipped in this package.

Nothing is fetched from the internet: Swagger UI, uPlot, marked and DOMPurify are vendored from npm under
static/vendor/ (see its README.md). The console is plain HTML, CSS and ES modules that call the public REST
API with the user's API key, so it can never do more than that key may. Its pages and /docs are sent with a
Content-Security-Policy that allows scripts from this service only, and no inline script: data shown in
the console (file names, model cards, model replies) cannot run as code even if it slipped into the page.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

STATIC_DIR = Path(__file__).parent / "static"
CONSOLE_PATH = "/console"
SWAGGER_ASSETS = f"{CONSOLE_PATH}/vendor/swagger-ui"
DOCS_PATH = "/docs"

# The console: scripts, styles, fonts and requests to this service only; no inline script or style
# attribute (the console sets styles through the CSSOM), no plugins, no framing, no <base> rewrites.
CONSOLE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; font-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
# /docs: the same, except that Swagger UI writes style attributes of its own.
DOCS_CSP = CONSOLE_CSP.replace("style-src 'self'", "style-src 'self' 'unsafe-inline'")
SECURITY_HEADERS = {"x-content-type-options": "nosniff", "referrer-policy": "no-referrer"}

DOCS_HTML = """<!doctype html>
<html lang="en">
  <head>
    <meta charset="utf-8">
    <meta name="viewport" content="width=device-width, initial-scale=1">
    <title>{title}</title>
    <link rel="stylesheet" href="{assets}/swagger-ui.css">
    <link rel="icon" href="{assets}/favicon-32x32.png">
  </head>
  <body>
    <div id="swagger-ui"></div>
    <script src="{assets}/swagger-ui-bundle.js"></script>
    <script src="{console}/docs.js"></script>
  </body>
</html>
"""


def install_console(app: FastAPI) -> None:
    """Serve /docs (Swagger UI from the package), /console and a redirect from / to it.

    The app must be created with `docs_url=None, redoc_url=None`: FastAPI's own pages load Swagger UI
    and ReDoc from a public CDN (and start Swagger UI with an inline script).
    """
    docs_page = DOCS_HTML.format(
        title=escape(f"{app.title} API"), assets=SWAGGER_ASSETS, console=CONSOLE_PATH
    )

    @app.get(DOCS_PATH, include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return HTMLResponse(docs_page)

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse(f"{CONSOLE_PATH}/")

    app.add_middleware(ContentSecurityPolicy)

    # html=True: /console/ answers index.html (and /console redirects there).
    app.mount(CONSOLE_PATH, StaticFiles(directory=STATIC_DIR, html=True), name="console")


class ContentSecurityPolicy:
    """The policy and security headers on the console's pages and /docs. Plain ASGI: the API requests it
    lets through untouched pay no task or stream for it."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (
            path in (DOCS_PATH, CONSOLE_PATH) or path.startswith(f"{CONSOLE_PATH}/")
        ):
            await self.app(scope, receive, send)
            return

        async def send_with_policy(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["content-security-policy"] = DOCS_CSP if path == DOCS_PATH else CONSOLE_CSP
                headers.update(SECURITY_HEADERS)
            await send(message)

        await self.app(scope, receive, send_with_policy)
