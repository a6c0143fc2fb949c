"""The lake's Delta tables and their Arrow schemas, derived from the one declaration of the
data model (``model.TABLES``) and of the ledger (``ledger.LEDGER``): no column is spelt here
that those declare.

* ``transactions`` / ``users``: the rows of each file that passed its own rules (fields, in-file
  copies), with the file's sha256 and ``write_id`` (which attempt wrote them), their line and
  raw text (a later file's conflict is rejected with them, as in local mode);
* ``rejects``: the rows the reading daemon refused, by line;
* ``files``: the ledger. ``lake_version`` is the Delta version the row was committed in, and
  ``file_id`` the file's place in the global order (both exact: ledger commits never retry onto
  another version, see ``store.Lake.commit_ledger``). A file's rows count only through its
  ledger row: rows whose (sha256, write_id) no ledger row names are invisible. A correction
  (retract, restore) is a ledger row too, with a file id of its own (its place in the order)
  and no bytes: ``correction`` says which, ``corrects`` names the file, ``reason`` says why.
"""

from __future__ import annotations

import pyarrow as pa

from moneylion.ledger import LEDGER
from moneylion.model import TABLES, FileKind

WRITE_ID = "write_id"
SHA256 = "file_sha256"
LAKE_VERSION = "lake_version"
CORRECTION = "correction"  # a correction's action (retract, restore); NULL on a file's row
CORRECTS = "corrects"  # the file id a correction acts on
REASON = "reason"  # why, as the one who asked for it said
# File ids any JSON reader holds exactly; past it, a ledger row is not one a daemon writes
# (and the ids after it would soon leave BIGINT).
FILE_ID_MAX = 2**53 - 1
# Columns every row table has before the model's: whose rows these are.
_OWNER = [pa.field(SHA256, pa.string(), nullable=False), pa.field(WRITE_ID, pa.int64(), False)]
_WHERE = [pa.field("line", pa.int64(), False), pa.field("raw_line", pa.string())]


def row_schema(kind: FileKind) -> pa.Schema:
    """A kind's Delta table: owner, the model's columns (their Arrow types), line, raw text."""
    columns = [pa.field(c.name, c.domain.arrow, nullable=False) for c in TABLES[kind].columns]
    return pa.schema([*_OWNER, *columns, *_WHERE])


REJECTS_SCHEMA = pa.schema(
    [
        *_OWNER,
        pa.field("line_number", pa.int64(), False),
        pa.field("reason", pa.string(), False),
        pa.field("message", pa.string(), False),
        pa.field("raw_line", pa.string()),
    ]
)
# Added to ``files`` after its first columns: a lake made before them gets them at a daemon's
# start (``store.Lake.create``).
CORRECTION_FIELDS = [
    pa.field(CORRECTION, pa.string()),
    pa.field(CORRECTS, pa.int64()),
    pa.field(REASON, pa.string()),
]
FILES_SCHEMA = pa.schema(
    [
        *(pa.field(name, kind) for name, kind in LEDGER.items()),
        pa.field(WRITE_ID, pa.int64()),
        pa.field(LAKE_VERSION, pa.int64(), False),
        *CORRECTION_FIELDS,
    ]
)
ROW_TABLES: dict[FileKind, str] = {kind: table.name for kind, table in TABLES.items()}
SCHEMAS: dict[str, pa.Schema] = {
    **{TABLES[kind].name: row_schema(kind) for kind in FileKind},
    "rejects": REJECTS_SCHEMA,
    "files": FILES_SCHEMA,
}


def app_id(sha256: str) -> str:
    """The Delta application transaction id of a file's rows (``Transaction.app_id``): its
    committed version is the ``write_id`` of the rows, so a retry reuses them."""
    return f"moneylion:{sha256}"


def correction_app_id(key: str) -> str:
    """The application transaction id of a correction's ledger entry: its committed version is
    the entry's file id, so a retry of the same request finds it instead of adding another."""
    return f"moneylion:correction:{key}"
