"""The Litestar application: seed-compatible ``/api``, versioned ``/v1``, ``/metrics``, ``/schema``.

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
from litestar import Litestar
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin

from moneylion import health
from moneylion.api.errors import log_api_error, problem_details_plugin
from moneylion.api.metrics import MetricsController, metrics_registry, prometheus_config
from moneylion.api.seed import seed_router
from moneylion.api.v1 import v1_router
from moneylion.api.warehouse import ApiContext, IngestView
from moneylion.config import Config
from moneylion.schema import open_warehouse

log = logging.getLogger(__name__)

Lifespan = Callable[[Litestar], AbstractAsyncContextManager[None]]


def create_app(
    config: Config,
    db: duckdb.DuckDBPyConnection | None = None,
    *,
    ingest: IngestView | None = None,
    lifespan: Sequence[Lifespan] = (),
) -> Litestar:
    """Build the API.

    ``db``: the daemon's connection (used, never closed); None -> the app opens the warehouse
    at startup and closes it at shutdown. ``ingest``: the daemon writing this warehouse in this
    process (see ``ApiContext``), None for an app reading a warehouse nobody here writes.
    ``lifespan``: context managers entered after the warehouse is open, exited before it closes.
    """
    ctx = ApiContext(config=config, db=db, ingest=ingest)

    @asynccontextmanager
    async def warehouse_lifespan(app: Litestar) -> AsyncIterator[None]:
        health.prime()
        owned = ctx.db is None
        if owned:
            ctx.db = await asyncio.to_thread(open_warehouse, config)
        log.info(
            "api_started",
            extra={"fields": {"warehouse": str(config.duckdb_path), "owns_connection": owned}},
        )
        try:
            yield
        finally:
            if ctx.replica is not None:
                ctx.replica.close()
            if owned and ctx.db is not None:
                conn, ctx.db = ctx.db, None
                conn.close()
            log.info("api_stopped")

    prometheus = prometheus_config()
    return Litestar(
        route_handlers=[seed_router, v1_router, MetricsController],
        state=State({"moneylion": ctx, "metrics_registry": metrics_registry(ctx)}),
        lifespan=[warehouse_lifespan, *lifespan],
        plugins=[problem_details_plugin()],
        middleware=[prometheus.middleware],
        after_exception=[log_api_error],
        openapi_config=OpenAPIConfig(
            title="moneylion",
            version="1",
            description="Exact aggregates over CSV files dropped in an inbox.",
            path="/schema",
            render_plugins=[SwaggerRenderPlugin()],
        ),
        logging_config=None,
    )
