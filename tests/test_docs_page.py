"""/docs: Swagger UI served from this service's own files under its Content-Security-Policy (no CDN, no
inline script), and an OpenAPI document that declares how keys are presented (the page's Authorize).
The page itself is driven in a browser by tests/test_browser.py."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

ROOT = Path(__file__).resolve().parent.parent


class _Assets(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[str | None] = []
        self.inline_scripts = 0
        self.styles: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "script":
            self.scripts.append(values.get("src"))
            self._in_script = True
        if tag == "link" and values.get("rel") in ("stylesheet", "icon"):
            self.styles.append(values["href"] or "")
        if tag == "style" or "style" in values or any(name.startswith("on") for name in values):
            self.inline_scripts += 1  # inline style or event handler: blocked by the CSP

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False if tag == "script" else self._in_script

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline_scripts += 1


@pytest.fixture(scope="module")
def client():
    from bento.core.config import Settings
    from bento.http.app import make_app

    app, _ = make_app(Settings(data_dir=Path("unused")), ROOT / "bento" / "static")
    with TestClient(app) as client:
        yield client


def test_docs_page_loads_only_its_own_files(client):
    page = client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assets = _Assets()
    assets.feed(page.text)
    assert assets.inline_scripts == 0, "the CSP blocks inline code"
    assert None not in assets.scripts and len(assets.scripts) == 2, assets.scripts
    for url in [*assets.scripts, *assets.styles]:
        assert url.startswith("/static/"), f"{url}: from this service, not a CDN"
        served = client.get(url)
        assert served.status_code == 200 and len(served.content) > 100, url
    bundle = client.get("/static/swagger/swagger-ui-bundle.js").text
    assert re.search(r"SwaggerUIBundle", bundle)
    assert "SwaggerUIBundle(" in client.get("/static/docs.js").text


def test_redoc_and_fastapi_s_cdn_page_are_gone(client):
    assert client.get("/redoc").status_code == 404
    assert "cdn.jsdelivr.net" not in client.get("/docs").text


def test_openapi_declares_how_keys_are_presented():
    import service

    spec = service.app.openapi()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["ApiKey"] == {**schemes["ApiKey"], "type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert schemes["Bearer"]["type"] == "http" and schemes["Bearer"]["scheme"] == "bearer"
    operations = [op for path in spec["paths"].values() for op in path.values()]
    assert operations and all({"ApiKey": []} in op.get("security", []) for op in operations), "every API route takes a key"
