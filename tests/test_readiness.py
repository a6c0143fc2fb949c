"""When a file may be taken (readiness.py) and where its complete records end (source.py), on
real files in tmp_path: the rules that decide how many parts a file takes."""

from __future__ import annotations

import csv
import io
import os
import time
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from moneylion.readiness import Arrival, Rules, Watch
from moneylion.source import header_bytes, records_end

RULES = Rules(settle=0.5, writer_timeout=5.0, empty_file=30.0)


def write(path: Path, data: bytes, *, age: float = 0.0) -> os.stat_result:
    """Write ``data`` and date the file ``age`` seconds back; its lstat."""
    path.write_bytes(data)
    if age:
        then = time.time() - age
        os.utime(path, (then, then))
    return os.lstat(path)


def test_a_renamed_file_is_ready_at_once_even_empty(tmp_path: Path) -> None:
    found = write(tmp_path / "x.csv", b"")
    watch = Watch(Arrival.COMPLETE, since=100.0, renamed=True)
    assert watch.ready_at(RULES, 100.0, found) == 100.0


def test_a_closed_file_is_ready_at_once_but_an_empty_one_waits_for_more(tmp_path: Path) -> None:
    found = write(tmp_path / "x.csv", b"a,b\n")
    assert Watch(Arrival.COMPLETE, since=100.0).ready_at(RULES, 100.0, found) == 100.0
    empty = write(tmp_path / "e.csv", b"", age=1000)
    # ": > x.csv" closes an empty file before "cat >> x.csv" writes it: not taken at the close.
    assert Watch(Arrival.COMPLETE, since=100.0).ready_at(RULES, 100.0, empty) == 130.0


def test_a_file_open_for_writing_waits_for_its_close_then_settles(tmp_path: Path) -> None:
    found = write(tmp_path / "x.csv", b"a,b\n", age=100)
    watch = Watch(Arrival.WRITING, since=100.0)
    assert watch.ready_at(RULES, 101.0, found) == 105.0  # quiet for long, but still open
    # Past the writer timeout the settle rule decides: a first look, then a second one.
    assert watch.ready_at(RULES, 106.0, found) == 106.5
    assert watch.arrival is Arrival.SETTLING
    assert watch.ready_at(RULES, 106.5, found) == 106.5


def test_a_settling_file_needs_two_looks_with_the_same_identity(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    found = write(path, b"a,b\n", age=100)  # quiet for long: the mtime alone would say ready
    watch = Watch(Arrival.SETTLING, since=10.0)
    assert watch.ready_at(RULES, 10.0, found) == 10.5  # first look: look again later
    changed = write(path, b"a,b\n1,2\n", age=100)  # changed between the looks, mtime still old
    assert watch.ready_at(RULES, 10.5, changed) == 11.0
    assert watch.ready_at(RULES, 11.0, os.lstat(path)) == 11.0  # the same twice: ready


def test_a_recently_written_file_waits_until_it_is_quiet(tmp_path: Path) -> None:
    found = write(tmp_path / "x.csv", b"a,b\n")  # written just now
    watch = Watch(Arrival.SETTLING, since=10.0)
    at = watch.ready_at(RULES, 10.0, found)
    assert 10.4 < at <= 10.5 + 0.05


def test_an_empty_settling_file_is_not_taken_by_time_alone(tmp_path: Path) -> None:
    found = write(tmp_path / "x.csv", b"", age=1000)
    watch = Watch(Arrival.SETTLING, since=10.0)
    assert watch.ready_at(RULES, 11.0, found) == 40.0
    assert watch.ready_at(RULES, 20.0, found) == 40.0


def test_a_late_create_does_not_downgrade_a_close() -> None:
    watch = Watch(Arrival.COMPLETE, since=1.0)
    watch.event(Arrival.SETTLING, 2.0)
    assert watch.arrival is Arrival.COMPLETE
    watch.event(Arrival.WRITING, 3.0)
    assert watch.arrival is Arrival.WRITING


def test_records_end_at_the_last_line_break_outside_quotes() -> None:
    assert records_end(b"") == 0
    assert records_end(b"1,2,3") == 0  # no line break yet
    assert records_end(b"1,2\n3,4") == 4
    assert records_end(b"1,2\n3,4\n") == 8
    assert records_end(b'1,"a\nb"\n2,"c\n') == 8  # the second record's quote is still open
    assert records_end(b'1,"a\nb"\n2,"c\nd"\n') == 16
    assert records_end(b'1,"say ""hi""\n"\n') == 16  # escaped quotes are two quotes
    assert records_end(b'"\n\n\n') == 0
    assert records_end(b"x\n1,2\n3", 2) == 6  # from a record's start


def test_a_last_record_without_its_line_break_counts_once_nothing_more_is_expected() -> None:
    assert records_end(b"1,2\n3,4", last=True) == 7
    assert records_end(b'1,2\n3,"a', last=True) == 4  # inside quotes: still cut
    assert records_end(b'1,2\n3,"a\nb"', last=True) == 11
    assert records_end(b"1,2\n", last=True) == 4
    assert records_end(b"", last=True) == 0


def test_header_bytes_keep_blank_lines_and_the_bom_before_the_header() -> None:
    assert header_bytes(b"a,b\n1,2\n") == b"a,b\n"
    assert header_bytes(b"\n  \r\n\xef\xbb\xbfa,b\r\n1,2\n") == b"\n  \r\n\xef\xbb\xbfa,b\r\n"
    assert header_bytes(b"a,b") == b"a,b"


fields = st.text(alphabet='ab,"\n ', max_size=6)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(fields, min_size=1, max_size=3), min_size=1, max_size=6), st.data())
def test_records_end_is_where_the_csv_module_sees_the_last_whole_record(
    rows: list[list[str]], data: st.DataObject
) -> None:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    text = out.getvalue().encode()
    ends = []  # where each record ends, by writing them one by one
    written = io.StringIO()
    for row in rows:
        csv.writer(written, lineterminator="\n").writerow(row)
        ends.append(len(written.getvalue().encode()))
    cut = data.draw(st.integers(0, len(text)))
    expected = max([0, *(end for end in ends if end <= cut)])
    assert records_end(text[:cut]) == expected
