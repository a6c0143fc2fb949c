"""Corrections in lake mode: a retraction or a restore is a ledger entry of the lake, applied by
every replica in order (``apply.apply_correction``), never a change of one local warehouse.

``publish_correction`` commits the entry (``store.Lake.commit_correction``: the next place in
the order, once per request); ``LakeCorrector`` is what a daemon's API asks: check what can be
checked here, publish, then wait (bounded) until this daemon's own replica has applied the
entry, and answer with what it did there, which is what every replica does.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time

import duckdb

from moneylion.corrections import Correction, CorrectionRefused, find_file
from moneylion.db import utc_now
from moneylion.lake.request import ACTIONS, CorrectionPending, LakeCorrection
from moneylion.lake.screen import Quarantined
from moneylion.lake.store import Lake
from moneylion.lake.tables import CORRECTION, CORRECTS, REASON
from moneylion.lake.tailer import LakeTailer

log = logging.getLogger(__name__)

WAIT_SECONDS = 30.0  # for this daemon's replica to apply it, before answering 202


def correction_row(request: LakeCorrection) -> dict[str, object]:
    """A correction's ledger columns but ``file_id`` and ``lake_version``: no bytes, no counts
    of its own (those are decided by each replica when it applies it)."""
    now = utc_now()
    return {
        "name": f"{request.action} #{request.file_id}",
        "sha256": None,
        "kind": None,
        "status": None,
        "rows_total": 0,
        "rows_loaded": 0,
        "rows_duplicate": 0,
        "rows_rejected": 0,
        "size_bytes": 0,
        "received_at": now,
        "finished_at": now,
        "seconds": 0.0,
        "error_reason": None,
        "error": None,
        CORRECTION: request.action,
        CORRECTS: request.file_id,
        REASON: request.reason,
    }


def publish_correction(lake: Lake, request: LakeCorrection, key: str | None = None) -> int:
    """Commit ``request`` to the lake's ledger; its change id (its file id in the lake, the
    same on every replica). ``key`` names the request: committing it again finds the entry.
    A file id the ledger has not reached is refused here (nothing is committed)."""
    if request.action not in ACTIONS:
        raise CorrectionRefused(f"{request.action} is not a correction of the lake")
    lake.refresh_index()
    if not 0 < request.file_id <= lake.index.last_file_id:
        raise CorrectionRefused(f"no file #{request.file_id} in the ledger")
    change_id = lake.commit_correction(correction_row(request), key or secrets.token_hex(16))
    log.info(
        "lake_correction_committed",
        extra={
            "fields": {
                "action": request.action,
                "file_id": request.file_id,
                "change_id": change_id,
                "reason": request.reason,
            }
        },
    )
    return change_id


def check_here(conn: duckdb.DuckDBPyConnection, request: LakeCorrection) -> None:
    """Refuse what this replica already knows will be refused: a correction of a file that is
    not in a status it applies to. Only from a replica that has applied the whole ledger (else
    an entry it has not applied yet may change the file's status first)."""
    file_id, kind, status = find_file(conn, request.file_id)
    action = ACTIONS[request.action]
    if kind is None or status not in action.applies_to:
        raise CorrectionRefused(
            f"file #{file_id} is {status}: {action.name} applies to a file that is "
            + " or ".join(action.applies_to)
        )


class LakeCorrector:
    """A daemon's corrections in lake mode (``Daemon.between_batches`` hands it the API's
    requests): one at a time, on a lake handle of its own."""

    def __init__(
        self,
        lake: Lake,
        tailer: LakeTailer,
        reader: duckdb.DuckDBPyConnection,
        wait_seconds: float = WAIT_SECONDS,
    ) -> None:
        self.lake = lake
        self.tailer = tailer
        self.reader = reader  # a connection of the local warehouse, used by this object only
        self.wait_seconds = wait_seconds
        self._lock = threading.Lock()

    def correct(self, request: LakeCorrection) -> Correction:
        """Publish ``request`` and answer with what this replica did when it applied it.
        ``CorrectionRefused``: refused before it was published, or where it stands in the
        order; ``CorrectionPending``: published, not applied here within the wait."""
        started = time.monotonic()
        with self._lock:
            files = self.lake.refresh_index()
            if self.tailer.mark.version >= files.version():
                cursor = self.reader.cursor()
                try:
                    check_here(cursor, request)
                finally:
                    cursor.close()
            change_id = publish_correction(self.lake, request)
        self.tailer.poke()
        outcome = self.tailer.settled(change_id, self.wait_seconds)
        if outcome is None:
            raise CorrectionPending(change_id, request.file_id, time.monotonic() - started)
        if isinstance(outcome, Quarantined):
            raise CorrectionRefused(outcome.message)
        return outcome
