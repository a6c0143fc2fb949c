"""``/metrics``: Litestar's Prometheus plugin for HTTP metrics, plus warehouse metrics.

The warehouse metrics are not counted in the process: a prometheus_client Collector reads the
ledger and the rejects table at scrape time, so they survive restarts and always agree with
``/v1/files``. Each app gets its own registry holding that collector and forwarding the
process-wide default registry (where the plugin's middleware keeps its HTTP metrics), so several
apps in one process (as in the tests) never collide.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from typing import TYPE_CHECKING

from litestar import MediaType, get
from litestar.datastructures import State
from litestar.plugins.prometheus import PrometheusConfig, PrometheusController
from litestar.response import Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from moneylion import health
from moneylion.api.queries import failed_files_by_reason, rejects_by_reason
from moneylion.api.warehouse import ApiContext

if TYPE_CHECKING:
    from moneylion.api.server import ConnectionGate

log = logging.getLogger(__name__)

STREAM_GAUGES = {
    "last_batch_files": "Files committed together in the last batch",
    "last_batch_rows": "Rows loaded by the last batch",
    "last_batch_seconds": "Seconds the last batch took",
    "files_per_second": "Files committed per second over the last minute",
    "rows_per_second": "Rows loaded per second over the last minute",
    "files_stuck": "Inbox files left alone: failing, and impossible to set aside",
    "files_waiting_for_disk": "Inbox files waiting for min_free_disk_bytes to be free",
}
STREAM_COUNTERS = {
    "commits": "Commits since the daemon started",
    "files_set_aside": "Files set aside for errors of the environment since the daemon started",
}
INGEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

_FILES_BY_STATUS = "SELECT status, count(*) FROM files GROUP BY status ORDER BY status"
_ROWS_BY_OUTCOME = """
SELECT coalesce(sum(rows_loaded), 0), coalesce(sum(rows_duplicate), 0),
       coalesce(sum(rows_rejected), 0)
FROM files
"""
_INGEST_SECONDS = (
    "SELECT "
    + ", ".join(f"count(*) FILTER (WHERE seconds <= {bound})" for bound in INGEST_BUCKETS)
    + ", count(*), coalesce(sum(seconds), 0) FROM files WHERE status = 'loaded'"
)


def prometheus_config() -> PrometheusConfig:
    """HTTP request metrics by route template (not raw path, to bound label cardinality)."""
    return PrometheusConfig(
        app_name="moneylion",
        prefix="moneylion_http",
        group_path=True,
        exclude=["^/metrics$"],
    )


class WarehouseCollector:
    """Ledger, rows, rejects and ingest-time metrics, read from the warehouse at each scrape."""

    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    def describe(self) -> Iterable[Metric]:
        return []  # metrics depend on the data; nothing to pre-register

    def collect(self) -> Iterator[Metric]:
        files, size = self.ctx.view.backlog()
        yield GaugeMetricFamily(
            "moneylion_inbox_backlog",
            "Files waiting in the inbox (being ingested included)",
            value=files,
        )
        yield GaugeMetricFamily(
            "moneylion_inbox_backlog_bytes", "Bytes of the files waiting in the inbox", value=size
        )
        yield from self._stream_metrics()
        yield from self._lake_metrics()
        up = GaugeMetricFamily("moneylion_warehouse_up", "1 when the warehouse is open")
        if self.ctx.db is None:
            up.add_metric([], 0)
            yield up
            return
        try:
            yield from self._warehouse_metrics()
        except Exception:
            log.exception("metrics_scrape_failed")
            up.add_metric([], 0)
        else:
            up.add_metric([], 1)
        yield up

    def _stream_metrics(self) -> Iterator[Metric]:
        """The daemon's worker: its last commit, rates, files set aside or left alone."""
        stream = self.ctx.view.stream()
        if stream is None:
            return
        values = {**asdict(stream), "files_stuck": self.ctx.view.files_stuck()}
        for name, text in STREAM_GAUGES.items():
            yield GaugeMetricFamily(f"moneylion_{name}", text, value=values[name])
        for name, text in STREAM_COUNTERS.items():
            yield CounterMetricFamily(f"moneylion_{name}", text, value=values[name])

    def _lake_metrics(self) -> Iterator[Metric]:
        """Lake mode: this replica's lag behind the shared lake."""
        lag = self.ctx.lake_lag()
        if lag is None:
            return
        for name, text, value in (
            ("lake_version", "The lake ledger's latest version seen", lag.lake_version),
            ("lake_applied_version", "Ledger versions applied here", lag.applied_version),
            ("lake_lag_versions", "Ledger versions not applied here yet", lag.versions),
            ("lake_lag_files", "Files committed to the lake not applied here yet", lag.files),
            (
                "lake_seconds_since_check",
                "Seconds since the lake was read",
                lag.seconds_since_check,
            ),
            (
                "lake_quarantined_files",
                "Lake ledger entries skipped here: a ledger row or a row broke a rule",
                lag.quarantined_files,
            ),
            (
                "lake_apply_failing",
                "1 while applying the lake fails here",
                1 if lag.apply_error is not None else 0,
            ),
        ):
            yield GaugeMetricFamily(f"moneylion_{name}", text, value=value)
        yield CounterMetricFamily(
            "moneylion_lake_apply_errors",
            "Attempts to apply the lake that failed here (retried)",
            value=lag.apply_errors,
        )

    def _warehouse_metrics(self) -> Iterator[Metric]:
        with self.ctx.cursor() as cursor:
            cursor.execute("BEGIN TRANSACTION")
            try:
                files = cursor.execute(_FILES_BY_STATUS).fetchall()
                failed = failed_files_by_reason(cursor)
                rows = cursor.execute(_ROWS_BY_OUTCOME).fetchone()
                rejects = rejects_by_reason(cursor)
                seconds = cursor.execute(_INGEST_SECONDS).fetchone()
                age = health.seconds_since_last_file(cursor)
            finally:
                cursor.execute("ROLLBACK")

        loaded, duplicate, rejected = rows if rows is not None else (0, 0, 0)
        rows_by = [("loaded", loaded), ("duplicate", duplicate), ("rejected", rejected)]
        yield _labelled("moneylion_files", "Files in the ledger by status", "status", files)
        yield _labelled(
            "moneylion_failed_files", "Failed files by file-level reason", "reason", failed
        )
        yield _labelled("moneylion_rows", "CSV rows by outcome", "outcome", rows_by)
        yield _labelled("moneylion_rejects", "Rejected rows by reason code", "reason", rejects)

        if seconds is not None:
            cumulative = [str(b) for b in INGEST_BUCKETS]
            buckets = [(bound, float(n)) for bound, n in zip(cumulative, seconds, strict=False)]
            buckets.append(("+Inf", float(seconds[len(INGEST_BUCKETS)])))
            yield HistogramMetricFamily(
                "moneylion_ingest_seconds",
                "Seconds to ingest a loaded file",
                buckets=buckets,
                sum_value=float(seconds[-1]),
            )

        last = GaugeMetricFamily(
            "moneylion_seconds_since_last_file", "Seconds since the newest file finished"
        )
        if age is not None:
            last.add_metric([], age)
            yield last


class ConnectionsCollector:
    """The HTTP server's open connections and its refusals past ``max_connections``."""

    def __init__(self, gate: ConnectionGate) -> None:
        self.gate = gate

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "moneylion_http_connections_open", "Open HTTP connections", value=self.gate.open
        )
        yield CounterMetricFamily(
            "moneylion_http_connections_refused",
            "Requests answered 503 and connections closed at once past max_connections",
            value=self.gate.refused,
        )


class _DefaultRegistry:
    """Forwards the process-wide registry (HTTP metrics from the plugin's middleware)."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def metrics_registry(ctx: ApiContext) -> CollectorRegistry:
    """This app's registry: warehouse metrics plus the process-wide default registry."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(WarehouseCollector(ctx))
    registry.register(_DefaultRegistry())
    return registry


class MetricsController(PrometheusController):
    """Litestar's Prometheus controller, exposing this app's registry."""

    path = "/metrics"

    @get(sync_to_thread=True, media_type=MediaType.TEXT)
    def get(self, state: State) -> Response[bytes]:
        """Prometheus text exposition."""
        registry: CollectorRegistry = state.metrics_registry
        return Response(
            generate_latest(registry),
            status_code=200,
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )


def _labelled(
    name: str, documentation: str, label: str, counts: Iterable[tuple[str, int]]
) -> CounterMetricFamily:
    """A counter with one label, a sample per (label value, count)."""
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, count in counts:
        family.add_metric([value], count)
    return family
