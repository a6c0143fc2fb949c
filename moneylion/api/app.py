"""The Litestar application: seed-compatible ``/api``, versioned ``/v1``, ``/metrics``, ``/schema``,
and the dashboard at ``/`` (``dashboard.py``); with ``api_token`` set, ``access.py`` guards them.

``create_app`` either borrows the daemon's open connection (and never closes it) or opens the
warehouse itself in its lifespan. Handlers are synchronous and run in worker threads, each on a
fresh cursor, so DuckDB never blocks the event loop and every read sees a committed snapshot.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import duckdb
from jinja2 import Environment, PackageLoader, StrictUndefined
from litestar import Litestar
from litestar.datastructures import State
from litestar.middleware import ASGIMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import (
    Components,
    OpenAPIMediaType,
    OpenAPIResponse,
    Operation,
    Reference,
    SecurityScheme,
)
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.template import TemplateConfig
from litestar.types import Middleware

from moneylion import health
from moneylion.api.access import LIVENESS_PATH, Access, RequestGuard, TokenMiddleware
from moneylion.api.checks import checks_router
from moneylion.api.corrections import corrections_router
from moneylion.api.dashboard import dashboard_router, static_router
from moneylion.api.errors import PROBLEM_MEDIA_TYPE, log_api_error, problem_details_plugin
from moneylion.api.metrics import MetricsController, metrics_registry, prometheus_config
from moneylion.api.seed import seed_router
from moneylion.api.swagger import VendoredSwaggerPlugin, docs_router
from moneylion.api.uploads import clear_uploads
from moneylion.api.v1 import v1_router
from moneylion.api.warehouse import ApiContext, DaemonView, IngestView, Standalone, WarehouseView
from moneylion.config import Config

log = logging.getLogger(__name__)

Lifespan = Callable[[Litestar], AbstractAsyncContextManager[None]]
# A request body's bound unless its route sets its own (uploads count theirs, the login is 4 KiB):
# past it, 413 before the body is read whole.
REQUEST_BODY_MAX_BYTES = 64 * 1024


def create_app(
    config: Config,
    db: duckdb.DuckDBPyConnection | None = None,
    *,
    ingest: IngestView | None = None,
    lifespan: Sequence[Lifespan] = (),
) -> Litestar:
    """Build the API on one view of the warehouse (``api.warehouse.WarehouseView``).

    With ``ingest``, the daemon writing this warehouse in this process, and its connection
    ``db`` (used, never closed): a ``DaemonView``. Without: a ``Standalone`` view on ``db``, or
    on a warehouse it opens at startup and closes at shutdown when ``db`` is None.
    ``lifespan``: context managers entered after the warehouse is open, exited before it closes.
    """
    view: WarehouseView
    if ingest is None:
        view = Standalone(config, db)
    elif db is None:
        raise TypeError("the daemon's view needs the daemon's connection (db)")
    else:
        view = DaemonView(config, ingest, db)
    ctx = ApiContext(config=config, view=view)

    @asynccontextmanager
    async def warehouse_lifespan(app: Litestar) -> AsyncIterator[None]:
        health.prime()
        await asyncio.to_thread(clear_uploads, config)
        await asyncio.to_thread(view.open)
        log.info(
            "api_started",
            extra={"fields": {"warehouse": str(config.duckdb_path), "view": type(view).__name__}},
        )
        try:
            yield
        finally:
            view.close()
            log.info("api_stopped")

    prometheus = prometheus_config()
    templates = templates_environment()
    # The guard first, in every mode: hosts, origins, the client behind trusted proxies.
    middleware: list[Middleware | ASGIMiddleware] = [RequestGuard(config), prometheus.middleware]
    access = Access.from_config(config) if config.api_token else None
    if access is not None:
        login = templates.get_template("login.html")
        middleware.insert(
            1,
            TokenMiddleware(
                access, lambda target, status, error: login.render(next=target, error=error)
            ),
        )
    app = Litestar(
        route_handlers=[
            seed_router,
            v1_router,
            corrections_router,
            checks_router,
            MetricsController,
            dashboard_router,
            static_router,
        ],
        state=State(
            {"moneylion": ctx, "metrics_registry": metrics_registry(ctx), "access": access}
        ),
        lifespan=[warehouse_lifespan, *lifespan],
        plugins=[problem_details_plugin()],
        middleware=middleware,
        request_max_body_size=REQUEST_BODY_MAX_BYTES,
        after_exception=[log_api_error],
        template_config=TemplateConfig(engine=JinjaTemplateEngine.from_environment(templates)),
        openapi_config=OpenAPIConfig(
            title="moneylion",
            version="1",
            description="Exact aggregates over CSV files dropped in an inbox.",
            path="/schema",
            openapi_router=docs_router("/schema"),
            # Served at /schema too; no other renderer (Litestar's load from a CDN).
            render_plugins=[VendoredSwaggerPlugin()],
            security=[{"bearer": []}] if config.api_token else None,
            components=Components(
                security_schemes={"bearer": SecurityScheme(type="http", scheme="bearer")}
            )
            if config.api_token
            else Components(),
        ),
        logging_config=None,
    )
    if config.api_token:
        document_token(app)
    return app


def document_token(app: Litestar) -> None:
    """Say in the OpenAPI schema (built now, then served as is) that every operation but
    liveness needs the bearer token and may answer 401, or 429 past auth_failures_per_minute."""
    problem_content = {
        PROBLEM_MEDIA_TYPE: OpenAPIMediaType(schema=Reference(ref="#/components/schemas/Problem"))
    }
    unauthorized = OpenAPIResponse(
        description="No token, or not the api_token", content=problem_content
    )
    locked_out = OpenAPIResponse(
        description="Too many failed tokens from this address (Retry-After says how long)",
        content=problem_content,
    )
    for path, item in (app.openapi_schema.paths or {}).items():
        for method in ("get", "post", "put", "patch", "delete"):
            operation: Operation | None = getattr(item, method)
            if operation is None:
                continue
            if path == LIVENESS_PATH:
                operation.security = [{}]  # no requirement: liveness answers anyone
            elif operation.responses is not None:
                operation.responses["401"] = unauthorized
                operation.responses["429"] = locked_out


def templates_environment() -> Environment:
    """The dashboard's Jinja templates (``api/templates/``), HTML-escaped by default."""
    return Environment(
        loader=PackageLoader("moneylion.api", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
