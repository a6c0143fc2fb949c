"""Which load paths a file takes, declared once, and the one runner that climbs them.

A ladder is the paths tried for one kind of file, fastest first; each covers what the one before
could not, and the last never gives up. DuckDB has no savepoints: a path that gives up (a
``Fallback``) is rolled back whole, and the runner begins the transaction again for the next.

Where each file goes, each decided in one place:
* by size (here, ``goes_alone``): a file past ``batch_file_max_bytes`` is loaded alone,
  climbing its kind's ladder (local mode) or streamed from DuckDB's reader (lake mode); smaller
  ones go in batches;
* by width (here, ``climb``): a file of more than ``Tuning.wide_columns`` fields skips the
  paths through DuckDB's reader (binding every column costs more than the reference rules);
* a batch (``batch.py``): every file checked by the reference rules, the batch decided in
  Python (``resolve_gathered``: its files are small, a statement's fixed cost is what they
  would pay);
* lake apply (``lake/paths.py``): a chunk of files of one kind, already checked by the daemon
  that read them, climbs ``LAKE_APPLY`` (straight from the lake's scan if alone and large, in
  Python if at most ``Tuning.gathered_rows`` rows, else by the SQL rules);
* lake publish (``lake/publish.py``): a file that ``goes_alone`` streams from DuckDB's reader
  if clean, else the reference rules read it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from moneylion.append import Checked, Fast, Located, Reference
from moneylion.config import Config
from moneylion.db import restart
from moneylion.load import Applied, Load, LoadPath
from moneylion.model import FileKind

log = logging.getLogger(__name__)

Ladder = tuple[LoadPath, ...]
Ladders = Mapping[FileKind, Ladder]

LADDERS: Ladders = {
    FileKind.USERS: (Fast(), Located(), Reference()),
    FileKind.TRANSACTIONS: (Fast(), Checked(), Reference()),
}
# What every other path is held to (tests, and a reader of the code): the reference rules alone.
REFERENCE_ONLY: Ladders = {kind: (Reference(),) for kind in FileKind}


class Named(Protocol):
    @property
    def name(self) -> str: ...


class LadderExhausted(RuntimeError):
    """Every path of a ladder gave up (only a ladder without the reference path can)."""


def climb(load: Load, ladder: Ladder, report: Callable[[str], None]) -> Applied:
    """Run ``ladder``'s paths on ``load`` inside its open transaction until one appends the
    file; each that gives up is rolled back (and the transaction begun again), logged
    (``ingest_fallback``) and reported."""
    skip_reader = load.header.field_count > load.tuning.wide_columns
    for at, path in enumerate(ladder):
        if skip_reader and path.uses_reader:
            continue
        applied = path.run(load)
        if isinstance(applied, Applied):
            return applied
        restart(load.conn)
        log.info(
            "ingest_fallback",
            extra={
                "fields": {
                    "file": load.header.file_name,
                    "path": path.name,
                    "reason": applied.reason,
                }
            },
        )
        skip_reader = skip_reader or applied.final
        later = [p for p in ladder[at + 1 :] if not (skip_reader and p.uses_reader)]
        report(f"{applied.reason}: {describe(later[0]) if later else 'no path left'}")
    raise LadderExhausted(f"{load.header.file_name}: every path of {names(ladder)} gave up")


def describe(path: LoadPath) -> str:
    """What a path does to a file, for the progress report."""
    return "validating every row" if not path.uses_reader else "checking them one by one"


def names(ladder: Sequence[Named]) -> str:
    return " -> ".join(path.name for path in ladder)


def goes_alone(csv_size: int, config: Config) -> bool:
    """Whether a file (its CSV's bytes) is loaded alone rather than in a batch."""
    return csv_size > config.batch_file_max_bytes


def from_each_rung(ladders: Ladders = LADDERS) -> dict[str, Ladders]:
    """Every kind's ladder started at each of its rungs in turn (``from_1``: without its first
    path, ...): each path is then the first tried, so a test running all of them holds every
    path to the last one."""
    depth = max(len(ladder) for ladder in ladders.values())
    return {
        f"from_{start}": {
            kind: ladder[min(start, len(ladder) - 1) :] for kind, ladder in ladders.items()
        }
        for start in range(depth)
    }
