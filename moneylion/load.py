"""What a load path is: given one file's rows to append inside an open transaction (``Load``), it
appends them (``Applied``) or gives up and says why (``Fallback``). ``ladder.py`` declares which
paths are tried for each kind of file, in which order, and runs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import duckdb

from moneylion.rules import VERDICTS, Counted, Verdict
from moneylion.tuning import Tuning
from moneylion.validate import Header, Source


@dataclass
class Applied:
    """What a file's rows came to: loaded, duplicate, and rejected by reason."""

    loaded: int = 0
    duplicate: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)

    @property
    def rejected(self) -> int:
        return sum(self.rejected_by_reason.values())

    def count(self, verdict: Verdict, rows: int = 1) -> None:
        """Count ``rows`` of a loaded or duplicate verdict (rejects are counted by reason as
        they are stored: ``pending.store_rejects``)."""
        counted = VERDICTS[verdict].counted
        if counted is Counted.LOADED:
            self.loaded += rows
        elif counted is Counted.DUPLICATE:
            self.duplicate += rows


@dataclass(frozen=True)
class Fallback:
    """A path gave up on a file (the runner rolls back and takes the next one): why, for the
    log. ``final``: no later path through DuckDB's reader can do better (the runner goes
    straight to the first that does not use it)."""

    reason: str
    final: bool = False


@dataclass(frozen=True)
class Load:
    """One file to append, inside the caller's open transaction."""

    conn: duckdb.DuckDBPyConnection
    source: Source  # its bytes, read once
    header: Header
    file_id: int
    line_bytes: int  # a reject's raw line is kept up to this (Config.reject_line_bytes)
    tuning: Tuning


class LoadPath(Protocol):
    """A way to append a file's rows."""

    @property
    def name(self) -> str:
        """For the log (``ingest_fallback``) and a ladder's description."""
        ...

    @property
    def uses_reader(self) -> bool:
        """Whether it reads through DuckDB's CSV reader (not for a wide file, nor after a
        ``final`` fallback)."""
        ...

    def run(self, load: Load) -> Applied | Fallback:
        """Append the file's rows, or give up (a Fallback) leaving the transaction to be
        rolled back."""
        ...
