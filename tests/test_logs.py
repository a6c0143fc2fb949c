"""JSON-lines logging: file format, console lines, rotation, idempotent setup, level counts."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from moneylion import logs
from moneylion.config import Config


@pytest.fixture
def console(config: Config) -> Iterator[io.StringIO]:
    stream = io.StringIO()
    logs.setup_logging(config, console=stream)
    yield stream
    logs.teardown_logging()


def read_lines(config: Config) -> list[dict[str, object]]:
    return [json.loads(line) for line in logs.log_file(config).read_text().splitlines()]


def test_a_record_is_one_json_line_with_ts_level_event_and_fields(
    config: Config, console: io.StringIO
) -> None:
    logging.getLogger("moneylion.ingest").info(
        "file_loaded", extra={"fields": {"file": "a.csv", "rows": 3, "seconds": 0.25}}
    )
    (line,) = read_lines(config)
    assert line["level"] == "INFO"
    assert line["event"] == "file_loaded"
    assert line["logger"] == "moneylion.ingest"
    assert (line["file"], line["rows"], line["seconds"]) == ("a.csv", 3, 0.25)
    assert str(line["ts"]).endswith("+00:00")
    assert "INFO" in console.getvalue()
    assert "file_loaded file=a.csv rows=3 seconds=0.25" in console.getvalue()


def test_exceptions_and_odd_values_still_make_valid_json(
    config: Config, console: io.StringIO
) -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("x").exception("it_failed", extra={"fields": {"path": config.inbox}})
    (line,) = read_lines(config)
    assert line["level"] == "ERROR"
    assert "ValueError: boom" in str(line["exc"])
    assert line["path"] == str(config.inbox)


def test_setup_twice_installs_the_handlers_once(config: Config, console: io.StringIO) -> None:
    logs.setup_logging(config, console=console)
    logging.getLogger("x").warning("once")
    assert len(read_lines(config)) == 1
    assert console.getvalue().count("once") == 1


def test_level_counts_parse_levels_not_substrings(config: Config, console: io.StringIO) -> None:
    log = logging.getLogger("x")
    log.info("an ERROR and a CRITICAL word in an info message")
    log.warning("careful", extra={"fields": {"level_hint": "ERROR"}})
    log.error("bad")
    log.debug("hidden")  # below the configured level: not written, not counted
    counts = logs.level_counts(config)
    assert counts == {"DEBUG": 0, "INFO": 1, "WARNING": 1, "ERROR": 1, "CRITICAL": 0}
    log.critical("worse")
    assert logs.level_counts(config)["CRITICAL"] == 1  # incremental read picks up new lines


def test_level_counts_skip_garbage_and_partial_lines(config: Config) -> None:
    path = logs.log_file(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        '{"level": "INFO", "event": "a"}\n'
        "not json at all ERROR\n"
        '["ERROR"]\n'
        '{"level": "NOTALEVEL"}\n'
        '{"level": "ERROR", "event": "unfinished'
    )
    assert logs.level_counts(config) == {
        "DEBUG": 0,
        "INFO": 1,
        "WARNING": 0,
        "ERROR": 0,
        "CRITICAL": 0,
    }
    with path.open("a") as handle:
        handle.write('"}\n')
    assert logs.level_counts(config)["ERROR"] == 1


def test_rotation_keeps_backups_and_counts_span_them(config: Config) -> None:
    small = config.with_overrides(log_max_bytes=2000, log_backups=2)
    stream = io.StringIO()
    logs.setup_logging(small, console=stream)
    try:
        log = logging.getLogger("x")
        counts_before = logs.level_counts(small)
        for i in range(30):
            log.warning("rotating", extra={"fields": {"i": i, "pad": "x" * 100}})
            if i % 7 == 0:
                logs.level_counts(small)  # reads interleaved with rotations
        files = sorted(p.name for p in small.log_dir.iterdir())
        assert files == ["moneylion.log", "moneylion.log.1", "moneylion.log.2"]
        on_disk = sum(
            1
            for p in small.log_dir.iterdir()
            for line in p.read_text().splitlines()
            if json.loads(line)["level"] == "WARNING"
        )
        assert 0 < on_disk < 30  # the oldest lines rotated away
        assert logs.level_counts(small)["WARNING"] == on_disk
        assert counts_before["WARNING"] == 0
    finally:
        logs.teardown_logging()


FORGED = "2026-01-01 12:00:00 ERROR    moneylion.worker disk_full"


@pytest.mark.parametrize(
    ("hostile", "shown"),
    [
        ("\n", "\\n"),
        ("\r", "\\r"),
        ("\x1b[2K", "\\x1b[2K"),
        ("\x7f", "\\x7f"),
        ("\x85", "\\x85"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ],
)
def test_console_lines_escape_control_characters_in_every_part(
    config: Config, console: io.StringIO, hostile: str, shown: str
) -> None:
    text, event = f"a{hostile}{FORGED}", f"event{hostile}x"
    logging.getLogger(f"moneylion{hostile}x").warning(
        event, extra={"fields": {f"key{hostile}": text, "path": text}}
    )
    output = console.getvalue()
    assert output.count("\n") == 1  # the record's own line end, nothing else
    for part in (f"moneylion{shown}x", f"event{shown}x", f"key{shown}=a{shown}{FORGED}"):
        assert part in output
    assert f"path=a{shown}{FORGED}" in output
    # The JSON file keeps the exact text, on one line whoever splits it.
    (line,) = read_lines(config)
    assert line["path"] == text


def test_a_backslash_is_escaped_so_it_cannot_fake_an_escape(
    config: Config, console: io.StringIO
) -> None:
    logging.getLogger("x").warning("e", extra={"fields": {"a": "\\n", "b": "\n"}})
    assert "a=\\\\n b=\\n" in console.getvalue()


def test_a_traceback_s_lines_are_marked_as_continuations(
    config: Config, console: io.StringIO
) -> None:
    try:
        raise ValueError(f"bad\n{FORGED}\x1b[31m")
    except ValueError:
        logging.getLogger("x").exception("it_failed")
    first, *rest = console.getvalue().splitlines()
    assert "it_failed" in first
    assert rest
    assert all(line.startswith(logs._CONTINUATION) for line in rest)
    assert f"{logs._CONTINUATION}{FORGED}\\x1b[31m" in rest
