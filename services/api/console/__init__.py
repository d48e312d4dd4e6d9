"""The web console and the API docs, served by the API itself from files shipped in this package.

Nothing is fetched from the internet: Swagger UI and uPlot are vendored from npm under static/vendor/
(see its README.md). The console is plain HTML, CSS and ES modules that call the public REST API with
the user's API key, so it can never do more than that key may.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"
CONSOLE_PATH = "/console"
SWAGGER_ASSETS = f"{CONSOLE_PATH}/vendor/swagger-ui"


def install_console(app: FastAPI) -> None:
    """Serve /docs (Swagger UI from the package), /console and a redirect from / to it.

    The app must be created with `docs_url=None, redoc_url=None`: FastAPI's own pages load Swagger UI
    and ReDoc from a public CDN.
    """

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} API",
            swagger_js_url=f"{SWAGGER_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{SWAGGER_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{SWAGGER_ASSETS}/favicon-32x32.png",
            # Swagger UI would send the spec to validator.swagger.io for its badge.
            swagger_ui_parameters={"validatorUrl": None},
        )

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse(f"{CONSOLE_PATH}/")

    # html=True: /console/ answers index.html (and /console redirects there).
    app.mount(CONSOLE_PATH, StaticFiles(directory=STATIC_DIR, html=True), name="console")
