"""``moneylion release`` / ``POST /v1/files/{id}/release``: load a held file as if it arrived now.

A file held by ``max_reject_share`` (``ingest.py``) loaded nothing; its bytes wait in
``held/<day>/``. Its release loads them, without the hold check, as the latest file: it keeps its
ledger id and takes the release's change id as its place in the order (``file_order``), which the
corrections follow. So the warehouse equals ingesting the same files with this one last.

One transaction (``ingest_staged`` with an ``ingest.Reload``): the held ledger row and its rejects
go; the file loads by the reference rules (they decide against every stored row, later files'
included); its ledger row says ``loaded`` with the counts and rejects of this load; a
``corrections`` row ``release``. A users file's profiles move the country totals of their users'
transactions of every file, those after it included (the deltas of a load move only the earlier
ones: a new file has the largest id). After the commit the file moves from held/ to done/.

The bytes must be the ledger's (sha256): a file missing from held/ is refused, with where it was
looked for (a file held by ``moneylion ingest`` stays where it was: a copy put in a day folder of
held/ under its name is found).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import stat
from pathlib import Path

import duckdb

from moneylion import aggregates, inbox, ledger
from moneylion.config import Config
from moneylion.corrections import Correction, CorrectionRefused, find_file
from moneylion.db import one_row, utc_now
from moneylion.errors import FileRefused
from moneylion.ingest import Finish, Reload, ingest_staged
from moneylion.ledger import FileOutcome, FileStatus
from moneylion.model import FileKind
from moneylion.source import Bounds, file_sha256, stage

log = logging.getLogger(__name__)

ACTION = "release"

# Users file: the country each user with transactions of later files has before the release.
_COUNTRIES_BEFORE = """
CREATE OR REPLACE TEMP TABLE release_countries AS
SELECT t.user_id, any_value(u.country) AS country
FROM transactions t LEFT JOIN users u ON u.user_id = t.user_id
WHERE t.file_id > $f GROUP BY t.user_id
"""
# ... and those whose country the release changed.
_MOVES = """
CREATE OR REPLACE TEMP TABLE release_moves AS
SELECT r.user_id, r.country AS old_country, u.country AS new_country
FROM release_countries r JOIN users u ON u.user_id = r.user_id
WHERE u.file_id = $f AND r.country IS DISTINCT FROM u.country
"""
# Their transactions of later files, out of the old country (-1) and into the new (+1).
_MOVED_LATER = """
SELECT t.transaction_date, m.{side} AS country, t.transaction_type, t.amount, {sign} AS sign
FROM transactions t JOIN release_moves m ON m.user_id = t.user_id WHERE t.file_id > {file_id}"""


def release(
    conn: duckdb.DuckDBPyConnection,
    file: int | str,
    config: Config,
    reason: str | None = None,
) -> Correction:
    """Load held file ``file`` (its id or sha256) from its bytes in held/, as the latest file.
    CorrectionRefused if it is not held, or its bytes are not there (or not the ledger's)."""
    started = dt.datetime.now(dt.UTC)
    file_id, kind, status = find_file(conn, file)
    if status != FileStatus.HELD or kind is None:
        raise CorrectionRefused(
            f"file #{file_id} is {status}: release applies to a file that is held"
        )
    name, sha256, size = one_row(
        conn, "SELECT name, sha256, size_bytes FROM files WHERE file_id = ?", [file_id]
    )
    found = find_held(config.held_dir, name, sha256, size)
    if found is None:
        raise CorrectionRefused(
            f"file #{file_id} ({name}, sha256 {sha256}) is held, but its bytes are not in "
            f"{config.held_dir}/<day>/ under its name: put them back there to release it"
        )
    try:
        staged = stage(found, config.staging_dir, bounds=Bounds.of(config))
    except FileRefused as refused:
        raise CorrectionRefused(f"file #{file_id}: {refused.message}") from None
    try:
        if staged.sha256 != sha256:  # changed since it was found
            raise CorrectionRefused(f"file #{file_id}: {found} no longer holds its bytes")
        change_id = ledger.next_file_ids(conn, 1)[0]  # outside the transaction (sequences)
        users = FileKind(kind) is FileKind.USERS

        def clear(conn: duckdb.DuckDBPyConnection) -> None:
            (now,) = one_row(conn, "SELECT status FROM files WHERE file_id = ?", [file_id])
            if now != FileStatus.HELD:
                raise CorrectionRefused(f"file #{file_id} is {now}: it is no longer held")
            conn.execute("DELETE FROM rejects WHERE file_id = ?", [file_id])
            conn.execute("DELETE FROM files WHERE file_id = ?", [file_id])
            conn.execute("INSERT OR REPLACE INTO file_order VALUES (?, ?)", [file_id, change_id])
            if users:
                conn.execute(_COUNTRIES_BEFORE, {"f": file_id})

        def inspect(conn: duckdb.DuckDBPyConnection, outcome: FileOutcome) -> None:
            if outcome.status is not FileStatus.LOADED:
                raise CorrectionRefused(f"file #{file_id} cannot load now: {outcome.error}")
            if users:
                _move_later_countries(conn, file_id, change_id)
            conn.execute(
                "INSERT INTO corrections (change_id, action, file_id, reason, made_at, "
                "rows_out, rows_in) VALUES (?, ?, ?, ?, ?, 0, ?)",
                [change_id, ACTION, file_id, reason, utc_now(), outcome.rows_loaded],
            )

        outcome = ingest_staged(
            conn,
            dataclasses.replace(staged, name=name),
            config,
            finish=Finish(inspect=inspect, reload=Reload(file_id, clear)),
        )
    finally:
        staged.discard()
    done = Correction(
        change_id=change_id,
        action=ACTION,
        file_id=file_id,
        kind=str(kind),
        status=FileStatus.LOADED,
        files=(file_id,),
        rows_out=0,
        rows_in=outcome.rows_loaded,
        files_changed=0,
        seconds=(dt.datetime.now(dt.UTC) - started).total_seconds(),
    )
    target = _put_away(found, config)
    log.info(
        "file_released",
        extra={
            "fields": {
                "file": name,
                "file_id": file_id,
                "change_id": change_id,
                "reason": reason,
                "loaded": outcome.rows_loaded,
                "duplicate": outcome.rows_duplicate,
                "rejected": outcome.rows_rejected,
                "to": None if target is None else str(target),
                "seconds": round(done.seconds, 4),
            }
        },
    )
    return done


def find_held(held_dir: Path, name: str, sha256: str, size: int) -> Path | None:
    """The file of these bytes among the names a file ``name`` may have in held/'s day
    folders (newest day first), or None."""
    if not held_dir.is_dir():
        return None
    days = sorted(
        (entry for entry in os.scandir(held_dir) if entry.is_dir(follow_symlinks=False)),
        key=lambda entry: entry.name,
        reverse=True,
    )
    for day in days:
        for candidate in inbox.candidate_names(name, Path(day.path)):
            try:
                found = os.lstat(candidate)
                if not stat.S_ISREG(found.st_mode) or found.st_size != size:
                    continue
                if file_sha256(candidate)[0] == sha256:
                    return candidate
            except OSError:
                continue
    return None


def _move_later_countries(conn: duckdb.DuckDBPyConnection, file_id: int, change_id: int) -> None:
    """The country totals of the transactions of files after ``file_id`` whose users' country
    the release changed (the load's deltas moved those of earlier files)."""
    conn.execute(_MOVES, {"f": file_id})
    (moved,) = one_row(conn, "SELECT count(*) FROM release_moves")
    if moved:
        rows = " UNION ALL ".join(
            _MOVED_LATER.format(side=side, sign=sign, file_id=int(file_id))
            for side, sign in (("old_country", -1), ("new_country", 1))
        )
        aggregates.merge_country(conn, aggregates.COUNTRY_MONTHLY_OF.format(rows=rows), change_id)
    conn.execute("DROP TABLE release_moves; DROP TABLE release_countries")


def _put_away(path: Path, config: Config) -> Path | None:
    """After the commit: the released file from held/ to done/<day>/ (where it went); left in
    held/ if it cannot move (logged: it changes nothing, the ledger says loaded)."""
    try:
        return inbox.move_without_overwrite(path, inbox.day_folder(config.done_dir))
    except OSError as exc:
        log.warning(
            "released_file_not_moved",
            extra={"fields": {"file": path.name, "error": f"{type(exc).__name__}: {exc}"}},
        )
        return None
