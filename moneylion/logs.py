"""JSON-lines logging with size rotation, readable console lines, and per-level counts.

Modules log events, not prose::

    log.info("file_loaded", extra={"fields": {"file": name, "rows": n, "seconds": s}})

``setup_logging(config)`` writes each record as one JSON object (``ts, level, event, logger,
**fields``) to ``config.log_dir / "moneylion.log"`` (rotated at ``log_max_bytes``, keeping
``log_backups`` old files) and a human-readable line to the console. Per-level counts are parsed
from the JSON lines of the retained log files (the ``level`` field, never a substring search), read
incrementally so a call only parses what was appended since the previous one.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from moneylion.config import Config

LOG_FILE_NAME = "moneylion.log"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# Marks the handlers this module installs, so a second setup_logging replaces them.
_OWNED = "_moneylion_handler"


def _fields(record: logging.LogRecord) -> Mapping[str, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, Mapping) else {}


# JSON escapes the C0 controls itself but leaves these raw, and they end a line for readers
# that split on every Unicode line break (Python's str.splitlines among them). They can only
# occur inside a JSON string, where the escape means the same character.
_JSON_LINE_BREAKS = {code: f"\\u{code:04x}" for code in (0x85, 0x2028, 0x2029)}


class JsonLineFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC, ISO 8601), level, event, logger, then the fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "event": record.getMessage(),
            "logger": record.name,
        }
        for key, value in _fields(record).items():
            if key not in line:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False).translate(_JSON_LINE_BREAKS)


# What a console line may not carry as is: C0 controls (newline, carriage return, ESC...), DEL,
# C1 controls, and the Unicode line and paragraph separators. A client can put any of them in a
# path or a value that gets logged; raw, they would end the line (and start a forged one) or
# drive the terminal. Each becomes a visible escape: "\n", "\x1b", "\u2028".
_CONSOLE_ESCAPES = {
    code: ascii(chr(code))[1:-1] for code in (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)
} | {ord("\\"): "\\\\"}
# A traceback's own lines, after the record's line, start with this: none can pass for a record.
_CONTINUATION = "  | "


def console_text(value: object) -> str:
    """``str(value)`` with every control character and line separator escaped (and the
    backslash, so an escape in the text cannot pass for one made here)."""
    return str(value).translate(_CONSOLE_ESCAPES)


class ConsoleFormatter(logging.Formatter):
    """``2026-01-01 12:00:00 INFO  moneylion.ingest file_loaded file=a.csv rows=3``: one line per
    record (every field, the message and the logger escaped by ``console_text``); a traceback
    follows on lines that each start with ``_CONTINUATION``."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created).strftime("%Y-%m-%d %H:%M:%S")
        name, message = console_text(record.name), console_text(record.getMessage())
        parts = [f"{ts} {record.levelname:<8} {name} {message}"]
        parts.extend(
            f"{console_text(key)}={console_text(value)}" for key, value in _fields(record).items()
        )
        text = " ".join(parts)
        if record.exc_info:
            # The exception's message may be a client's text: its lines are escaped one by one
            # (a newline in it stays a line break, but every line is marked as a continuation).
            trace = self.formatException(record.exc_info).split("\n")
            text += "".join(f"\n{_CONTINUATION}{console_text(line)}" for line in trace)
        return text


class _JsonLinesFile(logging.handlers.RotatingFileHandler):
    """Size rotation that formats each record once and keeps the file's size itself: the
    standard handler formats every record twice and stats and seeks the file for each, which
    a stream of small files (two records per file) pays thousands of times a second. The size
    counts this process's writes from the size found at open: it only decides when to rotate."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        super().__init__(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        self._size = path.stat().st_size

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
            size = len(line.encode("utf-8"))
            if self.maxBytes and self._size and self._size + size > self.maxBytes:
                self.doRollover()
                self._size = 0
            stream = self.stream or self._open()  # doRollover reopens it (delay is off)
            self.stream = stream
            stream.write(line)
            stream.flush()
            self._size += size
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def log_file(config: Config) -> Path:
    """Where setup_logging writes the JSON lines."""
    return config.log_dir / LOG_FILE_NAME


def setup_logging(config: Config, console: TextIO | None = None) -> Path:
    """Install the JSON file handler and the console handler on the root logger.

    Idempotent: calling it again (even with another config) replaces the handlers it installed
    before instead of adding more. Returns the path of the JSON log file.
    """
    teardown_logging()
    root = logging.getLogger()
    path = log_file(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    file_handler = _JsonLinesFile(path, config.log_max_bytes, config.log_backups)
    file_handler.setFormatter(JsonLineFormatter())
    console_handler = logging.StreamHandler(console if console is not None else sys.stderr)
    console_handler.setFormatter(ConsoleFormatter())
    for handler in (file_handler, console_handler):
        setattr(handler, _OWNED, True)
        root.addHandler(handler)
    root.setLevel(config.log_level.upper())
    return path


def teardown_logging() -> None:
    """Remove (and close) the handlers setup_logging installed."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _OWNED, False):
            root.removeHandler(handler)
            handler.close()


@dataclass
class _FileCount:
    """What has been parsed of one log file (identified by inode): byte offset and counts."""

    offset: int = 0
    counts: dict[str, int] = field(default_factory=dict)


class LevelCounter:
    """Per-level record counts over the retained JSON log files, parsed incrementally.

    Rotation renames files, so progress is keyed by inode: a renamed file keeps its counts and
    only the active file is read further. A line is counted once it is complete (ends in a
    newline) and is a JSON object with a ``level`` field; anything else is skipped.
    """

    def __init__(self, path: Path, backups: int) -> None:
        self.path = path
        self.backups = backups
        self._seen: dict[tuple[int, int], _FileCount] = {}
        self._lock = threading.Lock()

    def _paths(self) -> list[Path]:
        return [self.path] + [
            self.path.with_name(f"{self.path.name}.{n}") for n in range(1, self.backups + 1)
        ]

    def counts(self) -> dict[str, int]:
        """{"DEBUG": n, "INFO": n, "WARNING": n, "ERROR": n, "CRITICAL": n}."""
        with self._lock:
            total = dict.fromkeys(LEVELS, 0)
            alive: dict[tuple[int, int], _FileCount] = {}
            for path in self._paths():
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                key = (stat.st_dev, stat.st_ino)
                entry = self._seen.get(key) or _FileCount()
                if stat.st_size < entry.offset:  # truncated or a reused inode: start over
                    entry = _FileCount()
                if stat.st_size > entry.offset:
                    self._read_more(path, entry)
                alive[key] = entry
                for level, n in entry.counts.items():
                    total[level] = total.get(level, 0) + n
            self._seen = alive
            return total

    @staticmethod
    def _read_more(path: Path, entry: _FileCount) -> None:
        try:
            with path.open("rb") as handle:
                handle.seek(entry.offset)
                chunk = handle.read()
        except FileNotFoundError:  # rotated away between stat and open; next call sees it
            return
        end = chunk.rfind(b"\n")
        if end < 0:
            return
        for raw in chunk[: end + 1].splitlines():
            level = _parse_level(raw)
            if level is not None:
                entry.counts[level] = entry.counts.get(level, 0) + 1
        entry.offset += end + 1


def _parse_level(raw: bytes) -> str | None:
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    level = record.get("level")
    return level if isinstance(level, str) and level in LEVELS else None


_counters: dict[tuple[str, int], LevelCounter] = {}
_counters_lock = threading.Lock()


def level_counts(config: Config) -> dict[str, int]:
    """Per-level counts parsed from ``config``'s log files (one shared incremental counter)."""
    path = log_file(config)
    key = (os.fspath(path), config.log_backups)
    with _counters_lock:
        counter = _counters.get(key)
        if counter is None:
            counter = _counters[key] = LevelCounter(path, config.log_backups)
    return counter.counts()
