"""A daemon's parts in lake mode, wired for ``daemon.Daemon``: the publisher the worker ingests
through, the tailer that applies the ledger to the local warehouse, maintenance, and the
corrections the API asks for (published to the ledger, ``correct.py``)."""

from __future__ import annotations

import duckdb

from moneylion.config import Config
from moneylion.corrections import Correction
from moneylion.export.exporter import SqliteExporter
from moneylion.lake.correct import LakeCorrector
from moneylion.lake.publish import LakePublisher
from moneylion.lake.request import LakeCorrection
from moneylion.lake.tailer import LakeMaintenance, LakeTailer, lake_for
from moneylion.watcher import InboxQueue
from moneylion.worker import IngestWorker


class LakeMode:
    """What lake mode adds to a daemon, made before its threads start."""

    def __init__(
        self,
        conn: duckdb.DuckDBPyConnection,
        config: Config,
        exporter: SqliteExporter | None,
    ) -> None:
        self.config = config
        lake = lake_for(config)
        lake.create()
        self.tailer = LakeTailer(
            conn, config, on_applied=exporter.poke if exporter is not None else None
        )
        self.publisher = LakePublisher(lake, config, on_commit=self.tailer.poke)
        self.maintenance = LakeMaintenance(config)
        self.corrector = LakeCorrector(lake_for(config), self.tailer, conn.cursor())

    def worker(self, conn: duckdb.DuckDBPyConnection, queue: InboxQueue) -> IngestWorker:
        """The ingest worker, publishing to the lake instead of writing ``conn``."""
        return IngestWorker(
            conn,
            self.config,
            queue,
            ingest=self.publisher.ingest_file,
            batch=self.publisher.ingest_batch,
        )

    def correct(self, request: LakeCorrection) -> Correction:
        """A retraction or restore: published to the lake, answered once applied here."""
        return self.corrector.correct(request)

    def start(self) -> None:
        self.tailer.start()
        self.maintenance.start()

    def alive(self) -> bool:
        return self.tailer.is_alive()

    def stop(self) -> bool:
        self.maintenance.stop()
        return self.tailer.stop()
