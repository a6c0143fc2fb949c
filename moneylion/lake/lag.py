"""A replica's lag behind the lake: what ``/v1/health/ready``, ``/metrics`` and ``moneylion lake
status`` show (no import of deltalake: the API loads this in every mode)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LakeLag:
    """How far this replica is behind the lake (what health and metrics show)."""

    lake_version: int  # the files table's latest version seen
    applied_version: int  # every ledger commit up to here is applied
    lake_files: int  # files in the lake's ledger (the last file id)
    applied_files: int  # files applied here (the last file id)
    seconds_since_check: float  # since the lake's version was last read
    quarantined_files: int = 0  # ledger entries skipped: a row broke a rule (lake/screen.py)
    apply_errors: int = 0  # attempts to apply that failed here (retried), since the start
    apply_error: str | None = None  # the kind of error the last attempt ended in; None: none

    @property
    def versions(self) -> int:
        return max(0, self.lake_version - self.applied_version)

    @property
    def files(self) -> int:
        return max(0, self.lake_files - self.applied_files)
