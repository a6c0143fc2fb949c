"""``/metrics``: Litestar's Prometheus plugin for HTTP metrics, plus warehouse metrics.

The warehouse metrics are not counted in the process: a prometheus_client Collector reads the
ledger and the rejects table at scrape time, so they survive restarts and always agree with
``/v1/files``. Each app gets its own registry holding that collector and forwarding the
process-wide default registry (where the plugin's middleware keeps its HTTP metrics), so several
apps in one process (as in the tests) never collide.

A file's reject share is a histogram over the ledger's files, not the last file's share: a scrape
every 15 s sees one file of hundreds while a backlog drains, and an alert on a sample misses a
bad run between two scrapes or fires on one bad file among good ones. Buckets count every file,
so ``rate()`` over a window gives the share of recent files past a bound. A correction decides
other files' rows again (a conflict with a retracted row ends), so a bucket can fall by one:
Prometheus reads that as a reset, which can only make the alert on high shares quieter for one
window (``docs/prometheus/moneylion.rules.yml``), never fire it; ``_count`` never falls.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from typing import TYPE_CHECKING

import duckdb
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
from moneylion.ledger import FileStatus

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
# A file's rejected rows over its rows (exact: the bounds are DECIMAL literals in the SQL).
REJECT_SHARE_BUCKETS = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
# The corrections table's actions (sql/008_corrections.sql), each reported from zero so that
# ``increase()`` sees the first one.
CORRECTION_ACTIONS = ("retract", "restore", "replace", "hold", "release")

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
_REJECT_SHARE = (
    "SELECT "
    + ", ".join(
        f"count(*) FILTER (WHERE rows_rejected <= {bound} * rows_total)"
        for bound in REJECT_SHARE_BUCKETS
    )
    + ", count(*), coalesce(sum(rows_rejected / rows_total), 0) FROM files WHERE rows_total > 0"
)
_CORRECTIONS_BY_ACTION = "SELECT action, count(*) FROM corrections GROUP BY action ORDER BY action"
# The changes (files, corrections) committed after the export's watermark: how many, and the
# epoch (ms, UTC) of the oldest one's commit.
_EXPORT_BEHIND = """
SELECT count(*), epoch_ms(min(committed_at)) FROM (
    SELECT finished_at AS committed_at FROM files WHERE file_id > $exported
    UNION ALL
    SELECT made_at FROM corrections WHERE change_id > $exported
)
"""


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
        yield GaugeMetricFamily(
            "moneylion_inbox_backlog_age_seconds",
            "Seconds the oldest file waiting in the inbox has been there (0: none waits)",
            value=health.inbox_backlog_age(self.ctx.config.inbox) if files else 0.0,
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
                shares = cursor.execute(_REJECT_SHARE).fetchone()
                corrections = dict(cursor.execute(_CORRECTIONS_BY_ACTION).fetchall())
                age = health.seconds_since_last_file(cursor)
                behind = self._export_behind(cursor)
            finally:
                cursor.execute("ROLLBACK")

        loaded, duplicate, rejected = rows if rows is not None else (0, 0, 0)
        rows_by = [("loaded", loaded), ("duplicate", duplicate), ("rejected", rejected)]
        yield _labelled(
            "moneylion_files",
            "Files in the ledger by status (kept as a counter; moneylion_files_by_status is "
            "the gauge, which falls when a correction moves a file)",
            "status",
            files,
        )
        by_status = dict.fromkeys(map(str, FileStatus), 0) | dict(files)
        yield _gauges(
            "moneylion_files_by_status",
            "Files in the ledger now in each status (a correction moves a file between them)",
            "status",
            by_status.items(),
        )
        yield _labelled(
            "moneylion_corrections",
            "Corrections made, by action (the corrections table)",
            "action",
            (dict.fromkeys(CORRECTION_ACTIONS, 0) | corrections).items(),
        )
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
        if shares is not None:
            yield HistogramMetricFamily(
                "moneylion_file_reject_share",
                "Each file's rejected rows over its rows (files with rows)",
                buckets=[
                    *(
                        (str(b), float(n))
                        for b, n in zip(REJECT_SHARE_BUCKETS, shares, strict=False)
                    ),
                    ("+Inf", float(shares[len(REJECT_SHARE_BUCKETS)])),
                ],
                sum_value=float(shares[-1]),
            )
        yield from _export_lag(behind)

        last = GaugeMetricFamily(
            "moneylion_seconds_since_last_file", "Seconds since the newest file finished"
        )
        if age is not None:
            last.add_metric([], age)
            yield last

    def _export_behind(self, cursor: duckdb.DuckDBPyConnection) -> tuple[int, float | None] | None:
        """(changes the SQLite export does not hold yet, epoch of the oldest one's commit), or
        None when there is no export. An export not written or not readable holds nothing."""
        replica = self.ctx.replica
        if replica is None:
            return None
        exported = replica.exported_file_id() or 0
        count, oldest_ms = cursor.execute(_EXPORT_BEHIND, {"exported": exported}).fetchone() or (
            0,
            None,
        )
        return int(count), None if oldest_ms is None else float(oldest_ms) / 1000.0


def _export_lag(behind: tuple[int, float | None] | None) -> Iterator[Metric]:
    if behind is None:
        return
    changes, oldest = behind
    yield GaugeMetricFamily(
        "moneylion_sqlite_export_lag_changes",
        "Files and corrections committed to DuckDB that the SQLite export does not hold yet",
        value=changes,
    )
    yield GaugeMetricFamily(
        "moneylion_sqlite_export_lag_seconds",
        "Seconds since the oldest commit the SQLite export does not hold yet (0: caught up)",
        value=health.seconds_since(oldest) or 0.0,
    )


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


def _gauges(
    name: str, documentation: str, label: str, values: Iterable[tuple[str, float]]
) -> GaugeMetricFamily:
    """A gauge with one label, a sample per (label value, value)."""
    family = GaugeMetricFamily(name, documentation, labels=[label])
    for value, count in values:
        family.add_metric([value], count)
    return family


def _labelled(
    name: str, documentation: str, label: str, counts: Iterable[tuple[str, int]]
) -> CounterMetricFamily:
    """A counter with one label, a sample per (label value, count)."""
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, count in counts:
        family.add_metric([value], count)
    return family
