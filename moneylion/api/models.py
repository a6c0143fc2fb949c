"""Response bodies (msgspec Structs), which also give the OpenAPI schema its shapes.

Money: the seed's ``/api/*`` returns JSON numbers rounded to cents (its clients expect numbers);
``/v1`` returns exact decimal strings such as ``"1234.50"``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from decimal import Decimal
from typing import Annotated, Any

import msgspec

from moneylion.model import TRANSACTION_TYPES

Money = Annotated[str, msgspec.Meta(pattern=r"^-?[0-9]+\.[0-9]{2}$", examples=["1234.50"])]
_CENT = Decimal("0.01")


def money(value: Decimal) -> str:
    """An exact decimal string with two places: Decimal('12.5') -> '12.50'."""
    return format(value.quantize(_CENT), "f")


def seed_number(value: Decimal) -> float:
    """A JSON number rounded to cents, as the seed returned."""
    return float(value.quantize(_CENT))


def type_totals(found: object, render: Callable[[Decimal], Any]) -> dict[str, Any]:
    """``total_<type>`` of every transaction type, read from ``found``'s attributes of the same
    names and rendered (``money``, ``seed_number``)."""
    return {f"total_{kind}": render(getattr(found, f"total_{kind}")) for kind in TRANSACTION_TYPES}


# --- seed-compatible /api/* -------------------------------------------------------------------


class SeedError(msgspec.Struct):
    """The seed's error body: ``{"error": "User not found"}``."""

    error: str


class SeedUserSummary(msgspec.Struct):
    user_id: int
    country: str | None
    total_transaction_amount: float
    total_deposit: float
    total_withdrawal: float
    total_purchase: float


class SeedTopUser(msgspec.Struct):
    user_id: int
    country: str | None
    transaction_count: int


class SeedDailyTotal(msgspec.Struct):
    transaction_date: str
    transaction_type: str
    daily_total: float


class SeedHealth(msgspec.Struct):
    """Host readings under the seed's names, plus process and inbox readings."""

    # Named as health.HealthReading's fields, which fill them.
    cpu_usage_percent: float = msgspec.field(name="cpu_usage_%")
    num_cores: int
    memory_usage_percent: float = msgspec.field(name="memory_usage_%")
    disk_usage_percent: float = msgspec.field(name="disk_usage_%")
    process_rss_bytes: int
    uptime_seconds: float
    inbox_backlog: int
    inbox_backlog_bytes: int
    seconds_since_last_file: float | None
    # The daemon's worker (null when no daemon writes the warehouse in this process): its last
    # commit, and files and rows committed per second over the last minute.
    last_batch_files: int | None = None
    last_batch_rows: int | None = None
    files_per_second: float | None = None
    rows_per_second: float | None = None


class SeedLogCounts(msgspec.Struct):
    info_count: int
    warning_count: int
    error_count: int
    critical_count: int


# --- versioned /v1 ------------------------------------------------------------------------------


class Problem(msgspec.Struct, omit_defaults=True):
    """RFC 9457 problem details (``application/problem+json``)."""

    status: int
    title: str
    type: str = "about:blank"
    detail: str | None = None
    errors: list[Any] | None = None


class UserSummary(msgspec.Struct):
    """A user's totals; ``known_user`` is false for an orphan (transactions, no profile yet)."""

    user_id: int
    known_user: bool
    country: str | None
    signup_date: dt.date | None
    transaction_count: int
    total_amount: Money
    total_deposit: Money
    total_withdrawal: Money
    total_purchase: Money
    first_transaction_date: dt.date | None
    last_transaction_date: dt.date | None


class TopUser(msgspec.Struct):
    rank: int
    user_id: int
    country: str | None
    transaction_count: int


class TopUsers(msgspec.Struct):
    limit: int
    users: list[TopUser]


class DailyTotal(msgspec.Struct):
    date: dt.date
    type: str
    transaction_count: int
    total_amount: Money


class DailyTotals(msgspec.Struct):
    """One page of the range's days: ``next`` is the URL of the next page, null on the last."""

    date_from: dt.date = msgspec.field(name="from")
    date_to: dt.date = msgspec.field(name="to")
    type: str | None
    limit: int
    offset: int
    next_page: str | None = msgspec.field(name="next")
    days: list[DailyTotal]


class CountryMonth(msgspec.Struct):
    """One month and country (null: transactions of users not known yet)."""

    month: str  # YYYY-MM
    country: str | None
    transaction_count: int
    total_amount: Money
    deposit_count: int
    total_deposit: Money
    withdrawal_count: int
    total_withdrawal: Money
    purchase_count: int
    total_purchase: Money


class CountryMonthlyTotals(msgspec.Struct):
    """One page of the range's (month, country) rows: ``next`` is the URL of the next page, null
    on the last."""

    month_from: str | None = msgspec.field(name="from")
    month_to: str | None = msgspec.field(name="to")
    country: str | None
    limit: int
    offset: int
    next_page: str | None = msgspec.field(name="next")
    months: list[CountryMonth]


class FileEntry(msgspec.Struct):
    """One row of the files ledger."""

    file_id: int
    name: str
    sha256: str | None  # None for an entry refused unread (not a regular file, too large)
    kind: str | None
    status: str
    rows_total: int
    rows_loaded: int
    rows_duplicate: int
    rows_rejected: int
    size_bytes: int
    received_at: dt.datetime
    finished_at: dt.datetime
    seconds: float
    error_reason: str | None
    error: str | None
    part_of: int | None = None  # a continuation (tail.py): the file_id of the file's first part
    part: int = 1  # its place among the file's parts


class FilePart(msgspec.Struct):
    """One part of a file: the ledger row that loaded bytes [offset_start, offset_end) of it."""

    file_id: int
    part: int
    offset_start: int
    offset_end: int
    status: str
    rows_loaded: int
    rows_duplicate: int
    rows_rejected: int
    finished_at: dt.datetime


class FileCorrection(msgspec.Struct):
    """A correction of the file (``file_id``, its first part's), or one that put this file in
    another's place (``by_file_id``): what, when (UTC), why, and the base rows it moved."""

    change_id: int
    action: str
    file_id: int
    by_file_id: int | None
    reason: str | None
    made_at: dt.datetime
    rows_out: int
    rows_in: int


class FileDetail(FileEntry):
    rejected_by_reason: dict[str, int] = msgspec.field(default_factory=dict)
    bytes_loaded: int = 0  # of the whole file, through its last part
    parts: list[FilePart] = msgspec.field(default_factory=list)  # every part, the first included
    # Its corrections, oldest first: the last says when and why it has its status (retracted,
    # replaced, held, released).
    corrections: list[FileCorrection] = msgspec.field(default_factory=list)


class FilesPage(msgspec.Struct):
    total: int
    limit: int
    offset: int
    items: list[FileEntry]


class RejectEntry(msgspec.Struct):
    """One rejected row. ``raw_line`` is at most ``reject_line_bytes`` bytes of the line:
    ``raw_line_truncated`` says it is only its start, ``raw_line_bytes`` is the whole line's
    length (null for a line_too_long reject: longer than any reader takes, not measured)."""

    line: int
    reason: str
    message: str
    raw_line: str | None
    raw_line_bytes: int | None
    raw_line_truncated: bool


class RejectsPage(msgspec.Struct):
    """One page of a file's rejects: at most ``limit`` items, fewer when their bytes pass a
    bound; ``next`` is the URL of the next page (offset + items shown), null on the last."""

    file_id: int
    total: int
    limit: int
    offset: int
    next_page: str | None = msgspec.field(name="next")
    items: list[RejectEntry]


class Liveness(msgspec.Struct):
    status: str


class LakeReplica(msgspec.Struct):
    """Lake mode: how far this daemon's replica is behind the shared lake."""

    lake_version: int
    applied_version: int
    lag_versions: int
    lake_files: int
    applied_files: int
    lag_files: int
    seconds_since_check: float
    quarantined_files: int = 0  # ledger entries skipped: a row broke a rule (docs/lake.md)
    apply_errors: int = 0  # attempts to apply that failed here and were retried
    apply_error: str | None = None  # the kind of error the last attempt ended in


class DiskLowAnswer(msgspec.Struct):
    """The warehouse's disk has less free than ``min_free_disk_bytes``, or files wait for room
    to be staged (they stay in the inbox, and load once there is room)."""

    free_bytes: int
    min_free_disk_bytes: int
    files_waiting: int


class Readiness(msgspec.Struct):
    status: str
    warehouse_open: bool
    lake: LakeReplica | None = None
    disk_low: DiskLowAnswer | None = None
    # Files held back whole (too many rows refused, max_reject_share) until released: still
    # ready, but someone should look (/v1/files/{id}, POST /v1/files/{id}/release).
    held_files: int = 0


class LogStats(msgspec.Struct):
    debug: int
    info: int
    warning: int
    error: int
    critical: int


class UploadAnswer(msgspec.Struct):
    """``POST /v1/files``: ``queued`` (202: in the inbox, poll ``poll`` until it is in the
    ledger) or ``known`` (200: these bytes are in the ledger already, ``file`` says how)."""

    status: str
    sha256: str
    name: str
    size_bytes: int
    poll: str
    file: FileDetail | None = None
