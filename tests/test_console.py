"""The web console and the API docs: served by the API itself, with nothing fetched from the internet."""

from __future__ import annotations

import re

EXTERNAL_URL = re.compile(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", re.IGNORECASE)


def test_the_api_docs_load_swagger_ui_from_the_service_itself(api):
    page = api.get("/docs")
    assert page.status_code == 200
    html = page.text
    assert not EXTERNAL_URL.search(html), html
    assert "https://" not in html and "http://" not in html
    assets = re.findall(r"""(?:src|href)="(/[^"]+)\"""", html)
    assert {a.rsplit("/", 1)[-1] for a in assets} == {
        "swagger-ui.css",
        "swagger-ui-bundle.js",
        "favicon-32x32.png",
    }
    for asset in assets:
        assert api.get(asset).status_code == 200, asset
    # The spec it shows, and no validator badge that would post the spec to validator.swagger.io.
    assert "'/openapi.json'" in html and '"validatorUrl": null' in html
    assert api.get("/openapi.json").status_code == 200


def test_redoc_is_not_offered_because_it_would_load_from_a_cdn(api):
    assert api.get("/redoc").status_code == 404


def test_the_root_and_console_paths_lead_to_the_console_page(api):
    root = api.get("/", follow_redirects=False)
    assert root.status_code in (302, 307) and root.headers["location"] == "/console/"
    bare = api.get("/console", follow_redirects=False)
    assert bare.status_code in (301, 307) and bare.headers["location"].endswith("/console/")
    page = api.get("/console/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
