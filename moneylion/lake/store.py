"""The lake on a shared file system (or an object store): its four Delta tables, appends of a
file's rows, the ledger's commit, reads for the replicas, maintenance and status.

The ledger's commit is the commit point of the whole system. It is made at an exact version:
the ``files`` table is read at version v (which sha256s are in, how many files), the new rows
say ``lake_version = v + 1`` and ``file_id`` = the next places in the global order, and the
commit may only land as version v + 1 (``max_commit_retries=0``: delta-rs's put-if-absent of
the log entry). A daemon that loses that race reads the winner's rows and tries again. So every
sha256 is in the ledger once, file ids are consecutive in commit order, and a row's
``lake_version`` is its commit's. A correction's entry is committed the same way
(``commit_correction``), once per request: its application transaction names it.

One ``Lake`` per thread: DeltaTable objects are not shared between threads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError
from deltalake.schema import Field

from moneylion.errors import Transient
from moneylion.lake.tables import (
    CORRECTION_FIELDS,
    FILE_ID_MAX,
    FILES_SCHEMA,
    LAKE_VERSION,
    SCHEMAS,
    WRITE_ID,
    app_id,
    correction_app_id,
)
from moneylion.ledger import Known

log = logging.getLogger(__name__)

# The ledger's order (the first two decide for every row a daemon commits).
LEDGER_ORDER = (LAKE_VERSION, "file_id", "sha256", "name", WRITE_ID)
LEDGER_ATTEMPTS = 200  # commits lost to other daemons before a ledger commit gives up
# Compaction once a table has this many data files: a small file is one or a few commits.
COMPACT_AFTER_FILES = 64
COMPACT_TARGET_BYTES = 128 * 1024 * 1024
TABLE_CONFIGURATION = {
    # delta-rs writes a checkpoint itself every this many commits (a post-commit hook), so a
    # reader replays at most that many JSON entries; maintenance adds one after compacting.
    "delta.checkpointInterval": "100",
}


class LedgerContention(Transient):
    """Other daemons kept committing first: the files stay in the inbox and are retried."""


class LakeUnavailable(Transient):
    """The lake could not be read or written (its storage): retried after a pause."""


@dataclass
class LedgerIndex:
    """What the ledger holds as of ``version``: each sha256's file, and the last file id."""

    version: int = -1
    last_file_id: int = 0
    files: dict[str, Known] = field(default_factory=dict)


@dataclass(frozen=True)
class Candidate:
    """A file waiting for its ledger row: its ledger columns but ``file_id`` and
    ``lake_version`` (known only when the commit is made), and whose rows it names."""

    sha256: str | None
    row: dict[str, Any]
    write_id: int | None


@dataclass(frozen=True)
class Placed:
    """Where a candidate ended up: a new ledger row (``new``) or a file already there."""

    file_id: int
    new: bool
    known: Known
    lake_version: int


class Lake:
    """The four Delta tables under ``uri``, with this handle's snapshot of each and its index
    of the ledger."""

    def __init__(self, uri: str, storage_options: dict[str, str] | None = None) -> None:
        self.uri = uri.rstrip("/")
        self.storage_options = storage_options or None
        self._tables: dict[str, DeltaTable] = {}
        self.index = LedgerIndex()

    def path(self, name: str) -> str:
        return f"{self.uri}/{name}"

    def create(self) -> None:
        """Create any of the four tables that is missing (several daemons may race here: the
        one that loses finds the table the other made)."""
        for name, schema in SCHEMAS.items():
            if DeltaTable.is_deltatable(self.path(name), self.storage_options):
                continue
            try:
                DeltaTable.create(
                    self.path(name),
                    schema,
                    mode="ignore",
                    configuration=TABLE_CONFIGURATION,
                    storage_options=self.storage_options,
                )
            except (CommitFailedError, DeltaError):
                if not DeltaTable.is_deltatable(self.path(name), self.storage_options):
                    raise
        self._add_correction_columns()

    def _add_correction_columns(self) -> None:
        """A ledger made before corrections gets their columns (NULL on every row before)."""
        files = self.table("files")
        have = {field.name for field in files.schema().fields}
        missing = [f for f in CORRECTION_FIELDS if f.name not in have]
        if not missing:
            return
        try:
            files.alter.add_columns([Field.from_arrow(f) for f in missing])
        except (CommitFailedError, DeltaError):  # another daemon added them first
            files = self.table("files")
            if not {f.name for f in missing} <= {f.name for f in files.schema().fields}:
                raise

    def table(self, name: str) -> DeltaTable:
        """The table, brought up to its latest version."""
        found = self._tables.get(name)
        if found is None:
            found = DeltaTable(self.path(name), storage_options=self.storage_options)
            self._tables[name] = found
        else:
            found.update_incremental()
        return found

    def exists(self) -> bool:
        try:
            return all(
                DeltaTable.is_deltatable(self.path(n), self.storage_options) for n in SCHEMAS
            )
        except (DeltaError, TableNotFoundError, OSError):
            return False

    # --- a file's rows ------------------------------------------------------------------------

    def written(self, name: str, sha256: str) -> int | None:
        """The write id of a file's rows already committed in table ``name`` (None: none), as
        of the snapshot last read (``table``; this process's own appends move it). Costs a
        scan of the table's application transactions: call it for files that may have some."""
        if name not in self._tables:
            self.table(name)
        version = self._tables[name].transaction_version(app_id(sha256))
        return None if version is None else int(version)

    def append_rows(
        self, name: str, rows: pa.Table | pa.RecordBatchReader, owners: Sequence[tuple[str, int]]
    ) -> None:
        """Append the rows of some files in one commit that records, per file, an application
        transaction (its sha256's app id, its write id): ``written`` finds them after a crash.
        Blind appends: delta-rs retries them onto whatever version is next."""
        if isinstance(rows, pa.Table) and not rows.num_rows:
            return
        properties = CommitProperties(
            app_transactions=[Transaction(app_id=app_id(sha), version=w) for sha, w in owners]
        )
        write_deltalake(self.table(name), rows, mode="append", commit_properties=properties)

    def rows_of(self, name: str, owners: Sequence[tuple[str, int]]) -> ds.Dataset:
        """The data files of table ``name`` that may hold rows of ``owners`` (sha256, write
        id), as a dataset: the files outside the write ids' range are skipped by their
        statistics. The caller keeps only the owners' rows (a join on both columns: a write
        id names one attempt at one file, the sha256 makes it unambiguous)."""
        if not owners:
            return ds.dataset(SCHEMAS[name].empty_table())
        ids = [w for _, w in owners]
        prune = f"{WRITE_ID} >= {min(ids)} AND {WRITE_ID} <= {max(ids)}"
        return self.table(name).to_pyarrow_dataset(file_pruning_predicate=prune)

    # --- the ledger ---------------------------------------------------------------------------

    def ledger_since(self, version: int, table: DeltaTable | None = None) -> pa.Table:
        """The ledger rows committed after ``version`` (up to the version ``table`` is at), in
        the ledger's order: by commit, then file id (the same as file order for the rows
        ``commit_ledger`` writes), then the columns that tell any other rows apart, so that
        every reader sees rows written by others in one order too."""
        files = table if table is not None else self.table("files")
        if files.version() <= version:
            return FILES_SCHEMA.empty_table()
        dataset = files.to_pyarrow_dataset(file_pruning_predicate=f"{LAKE_VERSION} > {version}")
        found = dataset.to_table(filter=ds.field(LAKE_VERSION) > version)
        return found.sort_by([(name, "ascending") for name in LEDGER_ORDER])

    def refresh_index(self) -> DeltaTable:
        """Bring the ledger index up to the latest version of ``files``; the table at it."""
        files = self.table("files")
        version = files.version()
        if version > self.index.version:
            rows = self.ledger_since(self.index.version, files)
            for row in rows.select(
                ["file_id", "sha256", "status", "error_reason", "error"]
            ).to_pylist():
                # Rows another writer made need not be well formed (screen.py): a file id
                # out of range is not followed, and the first row of a sha256 is its file.
                if not isinstance(row["file_id"], int) or not 0 < row["file_id"] <= FILE_ID_MAX:
                    continue
                if row["sha256"] is not None:
                    known = (row["file_id"], row["status"], row["error_reason"], row["error"])
                    self.index.files.setdefault(row["sha256"], known)
                self.index.last_file_id = max(self.index.last_file_id, row["file_id"])
            self.index.version = version
        return files

    def commit_ledger(self, candidates: Sequence[Candidate]) -> list[Placed]:
        """Commit the ledger rows of the candidates not in the ledger yet, at an exact version
        (see the module's docstring); where each candidate is now."""
        for attempt in range(1, LEDGER_ATTEMPTS + 1):
            files = self.refresh_index()
            version = files.version() + 1
            placed: list[Placed] = []
            rows: list[dict[str, Any]] = []
            seen: dict[str, Placed] = {}
            next_id = self.index.last_file_id
            for candidate in candidates:
                sha = candidate.sha256
                found = self.index.files.get(sha) if sha is not None else None
                if found is not None:
                    placed.append(Placed(found[0], False, found, -1))
                    continue
                if sha is not None and sha in seen:  # the same bytes twice in this commit
                    placed.append(Placed(seen[sha].file_id, False, seen[sha].known, version))
                    continue
                next_id += 1
                row = {**candidate.row, "file_id": next_id, WRITE_ID: candidate.write_id}
                row[LAKE_VERSION] = version
                rows.append(row)
                known = (next_id, row["status"], row["error_reason"], row["error"])
                placed.append(Placed(next_id, True, known, version))
                if sha is not None:
                    seen[sha] = placed[-1]
            if not rows:
                return placed
            if not _commit_at(files, rows, version, attempt):
                continue
            for row in rows:
                if row["sha256"] is not None:
                    self.index.files[row["sha256"]] = (
                        row["file_id"],
                        row["status"],
                        row["error_reason"],
                        row["error"],
                    )
            self.index.last_file_id = next_id
            self.index.version = version
            return placed
        raise LedgerContention(f"no ledger commit after {LEDGER_ATTEMPTS} attempts")

    def commit_correction(self, row: dict[str, Any], key: str) -> int:
        """Commit a correction's ledger entry (``row``: its columns but ``file_id`` and
        ``lake_version``) at an exact version, as ``commit_ledger`` commits files: its file id
        is the next place in the order. Once per ``key`` (the request): its application
        transaction records the file id, so a retry finds the entry instead of adding another.
        The entry's file id."""
        app = correction_app_id(key)
        for attempt in range(1, LEDGER_ATTEMPTS + 1):
            files = self.refresh_index()
            found = files.transaction_version(app)
            if found is not None:
                return int(found)
            version = files.version() + 1
            file_id = self.index.last_file_id + 1
            entry = {**row, "file_id": file_id, WRITE_ID: None, LAKE_VERSION: version}
            if not _commit_at(files, [entry], version, attempt, Transaction(app, file_id)):
                continue
            self.index.last_file_id = file_id
            self.index.version = version
            return file_id
        raise LedgerContention(f"no ledger commit after {LEDGER_ATTEMPTS} attempts")

    # --- maintenance and status ------------------------------------------------------------------

    def maintain(self, compact_after_files: int = COMPACT_AFTER_FILES) -> dict[str, Any]:
        """Compact the tables with many small data files and write a checkpoint of their log.
        Readers are not disturbed: compaction only adds a version (old snapshots keep their
        files; nothing is vacuumed). A compaction that loses to another daemon's is skipped."""
        done: dict[str, Any] = {}
        for name in SCHEMAS:
            table = self.table(name)
            files = len(table.file_uris())
            if files < compact_after_files:
                continue
            try:
                metrics = table.optimize.compact(target_size=COMPACT_TARGET_BYTES)
                table.create_checkpoint()
            except (CommitFailedError, DeltaError) as exc:
                log.info(
                    "lake_compaction_skipped",
                    extra={"fields": {"table": name, "error": str(exc)[:200]}},
                )
                continue
            done[name] = {
                "removed": metrics.get("numFilesRemoved"),
                "added": metrics.get("numFilesAdded"),
            }
            log.info("lake_compacted", extra={"fields": {"table": name, **done[name]}})
        return done

    def status(self) -> dict[str, dict[str, Any]]:
        """Per table: its version, data files, bytes and rows (from the log's statistics)."""
        found: dict[str, dict[str, Any]] = {}
        for name in SCHEMAS:
            table = self.table(name)
            actions = table.get_add_actions(flatten=True)
            sizes = actions.column("size_bytes").to_pylist() if actions.num_rows else []
            records = actions.column("num_records").to_pylist() if actions.num_rows else []
            found[name] = {
                "version": table.version(),
                "files": len(sizes),
                "bytes": sum(sizes),
                "rows": sum(r or 0 for r in records),
            }
        return found


def _commit_at(
    files: DeltaTable,
    rows: list[dict[str, Any]],
    version: int,
    attempt: int,
    transaction: Transaction | None = None,
) -> bool:
    """Append ledger ``rows`` to ``files`` as exactly ``version`` (no retry onto another); False
    when another commit took that version first (after a short pause: read it and try again)."""
    properties = CommitProperties(
        max_commit_retries=0, app_transactions=[transaction] if transaction else None
    )
    table = pa.Table.from_pylist(rows, schema=FILES_SCHEMA)
    try:
        write_deltalake(files, table, mode="append", commit_properties=properties)
    except CommitFailedError as exc:
        log.info(
            "lake_commit_conflict",
            extra={"fields": {"version": version, "attempt": attempt, "error": str(exc)[:200]}},
        )
        time.sleep(min(0.001 * attempt, 0.05))
        return False
    # Landed as ``version`` (no retry could move it): the rows' lake_version is exact.
    if files.version() != version:
        raise RuntimeError(f"ledger commit landed as {files.version()}, not {version}")
    return True
