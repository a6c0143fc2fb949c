"""The knobs that trade speed against memory or statements, in one frozen dataclass.

Each is where two ways of doing the same work cross (``docs/performance.md`` measures where);
none changes a result, only how it is reached. They are not config keys: a ``Config`` holds the
project's ``Tuning`` (``Config.tuning``) and passes it down, and a test that wants the other
side of a crossing builds a ``Tuning`` with that value (``Config.with_overrides``) instead of
patching a module.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tuning:
    # Ingest (one file, a batch).
    wide_columns: int = 512  # past this many fields, DuckDB's reader is not used (bench/micro.py)
    reference_batch_rows: int = 100_000  # records the reference rules hold at once
    # A file of transactions up to this many CSV bytes hands its appended ids back to Python
    # (their range and copies then cost no statement); a larger one is asked with two.
    ids_back_bytes: int = 4 << 20
    # Lake apply: a large file alone loads straight from the lake's scan; a chunk of at most
    # this many rows is decided in Python, more by the SQL rules.
    alone_rows: int = 100_000
    gathered_rows: int = 2_000
    lake_stream_batch_rows: int = 1_000_000  # rows per Arrow batch a large file streams to the lake
    lake_chunk_files: int = 2_000  # files per local transaction while a replica catches up
    lake_chunk_rows: int = 500_000  # rows per local transaction while a replica catches up
    # Aggregates: past this many users touched, top users are recomputed rather than merged;
    # the user-totals log is compacted past this many rows.
    rebuild_threshold: int = 20_000
    compact_after_rows: int = 250_000
    # SQLite export.
    large_increment_rows: int = 50_000  # an increment this large goes through a side file
    compact_delta_users: int = 20_000  # user-total deltas folded into the table past this
    parallel_min_transactions: int = 1_000_000  # a full export writes in two threads past this
    checkpoint_every_changes: int = 20_000  # rows written between two WAL checkpoints


DEFAULT = Tuning()
