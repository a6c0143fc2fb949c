"""What one export did (``ExportResult``, its log event) and the steps it reports on the way."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Fault injection for the crash tests: called with the name of each step as it is reached
# ("side_written", "sqlite_begun", "rows_written", "before_commit", "committed",
# "aside_written", "before_rename"). None in production.
fault_hook: Callable[[str], None] | None = None


def reached(point: str) -> None:
    """Report a step to the fault hook, if any."""
    if fault_hook is not None:
        fault_hook(point)


@dataclass(frozen=True)
class ExportResult:
    """What one export wrote into the SQLite file."""

    sqlite_path: Path
    full: bool
    files: int
    users: int
    transactions: int
    first_file_id: int  # exclusive: the watermark before this export
    last_file_id: int  # the watermark after it
    seconds: float

    @property
    def exported_anything(self) -> bool:
        return self.last_file_id > self.first_file_id or self.full

    def summary(self) -> str:
        kind = "full export" if self.full else "export"
        if not self.exported_anything:
            return f"{kind}: {self.sqlite_path} is up to date (file #{self.last_file_id})"
        return (
            f"{kind}: files #{self.first_file_id + 1}..#{self.last_file_id} -> {self.sqlite_path}: "
            f"{self.files} files, {self.users} users, {self.transactions} transactions "
            f"in {self.seconds:.3f} s"
        )


def log_result(result: ExportResult) -> None:
    """The ``sqlite_exported`` event."""
    log.info(
        "sqlite_exported",
        extra={
            "fields": {
                "sqlite": str(result.sqlite_path),
                "full": result.full,
                "files": result.files,
                "users": result.users,
                "transactions": result.transactions,
                "last_file_id": result.last_file_id,
                "seconds": round(result.seconds, 4),
            }
        },
    )
