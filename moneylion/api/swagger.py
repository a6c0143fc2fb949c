"""The API docs page (``/schema`` and ``/schema/swagger``): Swagger UI from the package's own
``static/`` files, started by ``static/swagger-init.js``, with the dashboard's security headers.

Litestar's ``SwaggerRenderPlugin`` loads Swagger UI from a CDN and starts it with an inline
script holding the whole schema; this page has no inline script and names no other origin, so
it works with no network and under ``script-src 'self'``. The schema itself is fetched from
``/schema/openapi.json`` (same origin: the dashboard's session cookie goes with it).
"""

from __future__ import annotations

from html import escape
from typing import Any

from litestar import Request, Router
from litestar.openapi.plugins import OpenAPIRenderPlugin

from moneylion.api.dashboard import SECURITY_HEADERS

SWAGGER_UI_VERSION = "5.35.0"  # static/README.md says where the files come from
SCRIPTS = (f"/static/swagger-ui-bundle-{SWAGGER_UI_VERSION}.js", "/static/swagger-init.js")
STYLES = (f"/static/swagger-ui-{SWAGGER_UI_VERSION}.css", "/static/swagger-page.css")


class VendoredSwaggerPlugin(OpenAPIRenderPlugin):
    """Swagger UI rendered from vendored files only (see the module's docstring)."""

    def __init__(self, path: str = "/swagger") -> None:
        super().__init__(path=path, favicon="", style="")

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        title = escape(f"{openapi_schema['info']['title']} API")
        spec = escape(self.get_openapi_json_route(request))
        styles = "".join(f'<link rel="stylesheet" href="{href}">' for href in STYLES)
        scripts = "".join(f'<script src="{src}" defer></script>' for src in SCRIPTS)
        page = (
            '<!doctype html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{title}</title>{styles}{scripts}</head>"
            f'<body><div id="swagger-ui" data-spec="{spec}"></div></body></html>'
        )
        return page.encode()


def docs_router(path: str) -> Router:
    """The router Litestar adds the docs page and ``openapi.json`` to: the dashboard's headers
    (its content security policy among them) on each (a new one per app)."""
    return Router(
        path, route_handlers=[], include_in_schema=False, response_headers=SECURITY_HEADERS
    )
