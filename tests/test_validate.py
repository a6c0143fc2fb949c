"""Row and file policies, through real ingests into a DuckDB file in tmp_path.

Case files live in tests/cases/: ``row_<reason>.csv`` holds a good row on line 2, the bad row on
line 3 and a good row on line 4.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moneylion.aggregates import verify
from moneylion.append import Checked, Reference
from moneylion.config import Config, load_config
from moneylion.ingest import ingest_file
from moneylion.ladder import LADDERS, REFERENCE_ONLY, Ladders
from moneylion.model import COLUMNS, FileKind
from moneylion.reader import field_check_sql
from moneylion.rules import RejectReason
from moneylion.validate import parse_field

from .conftest import CASES_DIR, TX_HEADER

ROW_REASONS = [
    "missing_field",
    "bad_integer",
    "non_positive_id",
    "bad_date",
    "bad_amount",
    "non_positive_amount",
    "too_many_decimals",
    "unknown_type",
    "wrong_field_count",
]


def without(*left_out: type) -> Ladders:
    """The declared ladders without the paths a test says are not taken: the file must be
    appended by the others (else LadderExhausted)."""
    return {
        kind: tuple(path for path in ladder if not isinstance(path, left_out))
        for kind, ladder in LADDERS.items()
    }


def rejects_of(conn: duckdb.DuckDBPyConnection, file_id: int) -> list[tuple[int, str]]:
    return conn.execute(
        "SELECT line_number, reason FROM rejects WHERE file_id = ? ORDER BY line_number",
        [file_id],
    ).fetchall()


@pytest.mark.parametrize("reason", ROW_REASONS)
def test_bad_row_is_rejected_with_its_reason_and_line(
    warehouse: duckdb.DuckDBPyConnection, config: Config, reason: str
) -> None:
    outcome = ingest_file(warehouse, CASES_DIR / f"row_{reason}.csv", config)

    assert outcome.status == "loaded"
    assert (outcome.rows_loaded, outcome.rows_rejected) == (2, 1)
    assert outcome.rejected_by_reason == {reason: 1}
    assert outcome.file_id is not None
    assert rejects_of(warehouse, outcome.file_id) == [(3, reason)]
    assert warehouse.execute("SELECT sum(amount) FROM transactions").fetchall() == [
        (Decimal("30.50"),)
    ]
    assert verify(warehouse) == []


def test_conflicting_copies_in_one_file_are_all_rejected_identical_load_once(
    warehouse: duckdb.DuckDBPyConnection, config: Config
) -> None:
    outcome = ingest_file(warehouse, CASES_DIR / "row_duplicate_in_file.csv", config)

    assert outcome.file_id is not None
    assert rejects_of(warehouse, outcome.file_id) == [
        (3, "duplicate_in_file"),
        (4, "duplicate_in_file"),
    ]
    assert outcome.rows_loaded == 2
    users = ingest_file(warehouse, CASES_DIR / "users_copies.csv", config)
    assert users.file_id is not None
    assert (users.rows_loaded, users.rows_duplicate, users.rows_rejected) == (2, 1, 2)
    assert rejects_of(warehouse, users.file_id) == [
        (5, "duplicate_in_file"),
        (6, "duplicate_in_file"),
    ]
    assert warehouse.execute("SELECT user_id FROM users ORDER BY 1").fetchall() == [(1,), (2,)]
    assert verify(warehouse) == []


def test_bom_crlf_any_column_order_extra_columns_quotes_and_blank_lines(
    warehouse: duckdb.DuckDBPyConnection, config: Config
) -> None:
    outcome = ingest_file(warehouse, CASES_DIR / "bom_crlf_reordered_extra.csv", config)

    assert (outcome.kind, outcome.rows_loaded, outcome.rows_rejected) == ("transactions", 2, 0)
    rows = warehouse.execute(
        "SELECT transaction_id, user_id, amount, CAST(transaction_type AS VARCHAR) "
        "FROM transactions ORDER BY 1"
    ).fetchall()
    assert rows == [(100, 7, Decimal("10.50"), "deposit"), (101, 7, Decimal("20.00"), "withdrawal")]
    assert verify(warehouse) == []


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("file_empty.csv", "empty"),
        ("file_binary.csv", "binary"),
        ("file_not_utf8.csv", "not_utf8"),
        ("file_unknown_header.csv", "unknown_header"),
        ("file_missing_column.csv", "missing_column"),
    ],
)
def test_file_level_failure_records_reason_and_loads_nothing(
    warehouse: duckdb.DuckDBPyConnection, config: Config, case: str, reason: str
) -> None:
    outcome = ingest_file(warehouse, CASES_DIR / case, config)

    assert (outcome.status, outcome.error_reason) == ("failed", reason)
    assert outcome.error
    document = outcome.reason_document()
    assert document["reason"] == reason
    assert document["sha256"] == outcome.sha256
    ledger = warehouse.execute("SELECT status, error_reason FROM files").fetchall()
    assert ledger == [("failed", reason)]
    counts = warehouse.execute(
        "SELECT (SELECT count(*) FROM transactions) + (SELECT count(*) FROM users)"
    ).fetchall()
    assert counts == [(0,)]
    again = ingest_file(warehouse, CASES_DIR / case, config)
    assert (again.status, again.file_id) == ("failed", outcome.file_id)
    assert warehouse.execute("SELECT count(*) FROM files").fetchall() == [(1,)]
    assert verify(warehouse) == []


def test_invalid_utf8_far_into_a_file_fails_the_whole_file(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path
) -> None:
    path = tmp_path / "late_bad_byte.csv"
    rows = [f"{i},1,2022-01-01,1.00,deposit" for i in range(1, 20_001)]
    rows[15_000] = "15001,1,2022-01-01,1.00,d\xe9posit"
    path.write_bytes(
        b"transaction_id,user_id,transaction_date,amount,transaction_type\n"
        + "\n".join(rows).encode("latin-1")
        + b"\n"
    )

    outcome = ingest_file(warehouse, path, config)

    assert (outcome.status, outcome.error_reason) == ("failed", "not_utf8")
    assert warehouse.execute("SELECT count(*) FROM transactions").fetchall() == [(0,)]
    assert verify(warehouse) == []


def test_a_row_with_several_faults_reports_the_first_in_column_order(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path
) -> None:
    path = tmp_path / "faults.csv"
    path.write_text(
        "amount,transaction_type,transaction_date,user_id,transaction_id\n"
        "1.234,refund,2022-13-01,0,abc\n"
        "1.234,refund,2022-13-01,0,5\n"
        "1.234,refund,2022-13-01,6,5\n"
        "1.234,refund,2022-12-01,6,5\n"
        "-1,refund,2022-12-01,6,5\n"
    )

    outcome = ingest_file(warehouse, path, config)

    assert outcome.file_id is not None
    assert rejects_of(warehouse, outcome.file_id) == [
        (2, "bad_integer"),
        (3, "non_positive_id"),
        (4, "bad_date"),
        (5, "too_many_decimals"),
        (6, "non_positive_amount"),
    ]
    assert verify(warehouse) == []


def test_reject_rows_keep_a_message_and_the_raw_line(
    warehouse: duckdb.DuckDBPyConnection, config: Config
) -> None:
    outcome = ingest_file(warehouse, CASES_DIR / "row_bad_amount.csv", config)

    message, raw = warehouse.execute(
        "SELECT message, raw_line FROM rejects WHERE file_id = ?", [outcome.file_id]
    ).fetchall()[0]
    assert "1,000" in message
    assert raw == '6,11,2022-01-02,"1,000",deposit'
    assert verify(warehouse) == []


@pytest.mark.parametrize(
    ("column", "text", "expected"),
    [
        ("transaction_id", "0", RejectReason.NON_POSITIVE_ID),
        ("transaction_id", "-3", RejectReason.NON_POSITIVE_ID),
        ("transaction_id", "12.0", RejectReason.BAD_INTEGER),
        ("transaction_id", "abc", RejectReason.BAD_INTEGER),
        ("transaction_id", "1e3", RejectReason.BAD_INTEGER),
        ("transaction_id", "9223372036854775808", RejectReason.BAD_INTEGER),
        ("transaction_id", "9223372036854775807", None),
        ("transaction_date", "2022-02-30", RejectReason.BAD_DATE),
        ("transaction_date", "2022-2-3", RejectReason.BAD_DATE),
        ("transaction_date", "2024-02-29", None),
        ("amount", "12", None),
        ("amount", "12.5", None),
        ("amount", "0", RejectReason.NON_POSITIVE_AMOUNT),
        ("amount", "-1", RejectReason.NON_POSITIVE_AMOUNT),
        ("amount", "1.234", RejectReason.TOO_MANY_DECIMALS),
        ("amount", "1e3", RejectReason.BAD_AMOUNT),
        ("amount", "$5", RejectReason.BAD_AMOUNT),
        ("amount", "1,000", RejectReason.BAD_AMOUNT),
        ("amount", "12345678901234567.00", RejectReason.BAD_AMOUNT),
        ("amount", "9999999999999999.99", None),
        ("transaction_type", "Deposit", None),
        ("transaction_type", "refund", RejectReason.UNKNOWN_TYPE),
        ("country", "", RejectReason.MISSING_FIELD),
    ],
)
def test_field_rules(column: str, text: str, expected: RejectReason | None) -> None:
    _, reason, _ = parse_field(column, text)
    assert reason == expected


FIELD_TEXT = st.one_of(
    st.text(alphabet="0123456789.-+e ,$\t", max_size=22),
    st.from_regex(r"\A[0-9]{4}-[0-9]{2}-[0-9]{2}\Z"),
    st.sampled_from(["deposit", "Withdrawal", "PURCHASE", "refund", " deposit", "Japan", " "]),
    st.text(max_size=6),
)
ALL_COLUMNS = sorted({c for kind in FileKind for c in COLUMNS[kind]})


@pytest.mark.slow  # a property test: hypothesis runs it many times
@settings(max_examples=400, deadline=None)
@given(column=st.sampled_from(ALL_COLUMNS), raw=FIELD_TEXT)
def test_fast_path_accepts_only_what_the_reference_accepts_with_the_same_value(
    column: str, raw: str
) -> None:
    """The DuckDB checks may send a good field to the reference path, never a bad one past it."""
    conn = duckdb.connect()
    fast_ok, fast_value = conn.execute(field_check_sql(column), {"v": raw}).fetchall()[0]
    value, reason, _ = parse_field(column, raw.strip(" \t"))
    if fast_ok:
        assert reason is None
        assert fast_value == value


def test_copy_of_cases_under_a_new_name_is_the_same_file(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path
) -> None:
    first = ingest_file(warehouse, CASES_DIR / "row_bad_date.csv", config)
    renamed = tmp_path / "renamed.csv"
    shutil.copy(CASES_DIR / "row_bad_date.csv", renamed)

    again = ingest_file(warehouse, renamed, config)

    assert (again.status, again.file_id) == ("duplicate_file", first.file_id)
    assert warehouse.execute("SELECT count(*) FROM rejects").fetchall() == [(1,)]
    assert verify(warehouse) == []


@pytest.mark.parametrize("ladder", ["readers", "reference"])
def test_small_batches_give_the_same_rejects_and_rows(
    warehouse: duckdb.DuckDBPyConnection, config: Config, ladder: str
) -> None:
    """The reference rules read a file in batches (validate_rows), the reader paths page the
    rows failing a check through them: copies and lines must not depend on the cut."""
    config = config.with_overrides(tuning=replace(config.tuning, reference_batch_rows=2))
    ladders = on_path(ladder)
    outcome = ingest_file(
        warehouse, CASES_DIR / "row_duplicate_in_file.csv", config, ladders=ladders
    )
    bad = ingest_file(warehouse, CASES_DIR / "row_unknown_type.csv", config, ladders=ladders)

    assert outcome.file_id is not None
    assert bad.file_id is not None
    assert rejects_of(warehouse, outcome.file_id) == [
        (3, "duplicate_in_file"),
        (4, "duplicate_in_file"),
    ]
    assert rejects_of(warehouse, bad.file_id) == [(3, "unknown_type")]
    assert warehouse.execute("SELECT count(*) FROM transactions").fetchall() == [(3,)]
    assert verify(warehouse) == []


@pytest.mark.parametrize(
    "case",
    [
        "mixed_quoted_crlf.csv",
        "mixed_plain_blank.csv",
        "mixed_plain.csv",
        "mixed_plain_field_counts.csv",
        "row_wrong_field_count.csv",
    ],
)
def test_located_and_reference_paths_agree_line_for_line(
    config: Config, tmp_path: Path, case: str
) -> None:
    """Rows failing a fast check are located by ordinal, then mapped to lines; the reference
    path reads every line itself. Both must store the same rows and the same rejects."""
    from moneylion import ingest, schema

    def load(
        folder: str, ladders: Ladders = LADDERS
    ) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
        conn = schema.connect(tmp_path / folder / "w.duckdb")
        ingest.ingest_file(conn, CASES_DIR / case, config, ladders=ladders)
        assert verify(conn) == []
        stored = conn.execute("SELECT * EXCLUDE (file_id) FROM transactions ORDER BY 1").fetchall()
        rejects = conn.execute(
            "SELECT line_number, reason, message, raw_line FROM rejects ORDER BY 1, 2"
        ).fetchall()
        conn.close()
        return stored, rejects

    located = load("located")
    reference = load("reference", REFERENCE_ONLY)

    assert located == reference
    assert located[1], "the case must hold rows to reject"


@pytest.mark.parametrize("case", ["mixed_plain_field_counts.csv", "row_wrong_field_count.csv"])
def test_wrong_field_counts_in_a_file_of_plain_lines_do_not_need_the_reference_path(
    warehouse: duckdb.DuckDBPyConnection,
    config: Config,
    case: str,
) -> None:
    """DuckDB's reader sets such records aside with their line; when every line is one record
    (no quotes, carriage returns or empty lines) the located path places them itself."""
    from moneylion import ingest

    outcome = ingest.ingest_file(warehouse, CASES_DIR / case, config, ladders=without(Reference))
    assert outcome.file_id is not None
    assert outcome.rejected_by_reason.get("wrong_field_count")
    assert verify(warehouse) == []


@pytest.mark.parametrize("note", ["plain", '"a, quoted note"'])
def test_quoted_fields_on_one_line_leave_the_lines_to_records(
    warehouse: duckdb.DuckDBPyConnection,
    config: Config,
    tmp_path: Path,
    note: str,
) -> None:
    """Quotes alone do not stop the located path from placing records by their line: every
    line is still one record (the lines counted equal the records read plus those set aside)."""
    from moneylion import ingest

    path = tmp_path / "quoted.csv"
    path.write_text(
        "transaction_id,user_id,transaction_date,amount,transaction_type,note\n"
        f'1,1,2022-01-01,"1,000",deposit,{note}\n'
        "2,1,2022-01-02\n"
        f"3,1,2022-01-03,3.00,deposit,{note},extra\n"
        f"4,1,2022-01-04,4.00,deposit,{note}\n"
    )
    outcome = ingest.ingest_file(warehouse, path, config, ladders=without(Reference))
    assert outcome.file_id is not None
    assert rejects_of(warehouse, outcome.file_id) == [
        (2, "bad_amount"),
        (3, "wrong_field_count"),
        (4, "wrong_field_count"),
    ]
    messages = warehouse.execute("SELECT message FROM rejects ORDER BY line_number").fetchall()
    assert messages[1:] == [("expected 6 fields, found 3",), ("expected 6 fields, found 7",)]
    assert outcome.rows_loaded == 1
    assert verify(warehouse) == []


MULTILINE_WITH_WRONG_COUNT = (
    "transaction_id,user_id,transaction_date,amount,transaction_type,note\n"
    '1,1,2022-01-01,1.00,deposit,"two\nlines"\n'
    "2,1,2022-01-02\n"
)


def test_a_record_spanning_lines_and_a_wrong_field_count_take_the_reference_path(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path
) -> None:
    """A quoted field holding a line break: the reader's line numbers are not the records'."""
    path = tmp_path / "multiline.csv"
    path.write_text(MULTILINE_WITH_WRONG_COUNT + "3,1,2022-01-03,3.00,deposit,x\n")
    outcome = ingest_file(warehouse, path, config)
    assert outcome.file_id is not None
    assert rejects_of(warehouse, outcome.file_id) == [(4, "wrong_field_count")]
    assert outcome.rows_loaded == 2
    assert verify(warehouse) == []


@pytest.mark.parametrize(
    ("extra", "quoted"),
    [(",,", False), (",", False), (',""', True), (",,,,", False), (',"",', True)],
)
def test_extra_empty_fields_are_a_wrong_field_count_not_dropped(
    warehouse: duckdb.DuckDBPyConnection,
    config: Config,
    tmp_path: Path,
    extra: str,
    quoted: bool,
) -> None:
    """DuckDB's reader by default drops extra fields that are empty (``...,deposit,,`` read as
    5 fields); the policy counts them, whichever path reads the file."""
    path = tmp_path / "extra.csv"
    path.write_text(
        "transaction_id,user_id,transaction_date,amount,transaction_type\n"
        "1,1,2022-01-01,1.00,deposit\n"
        f"2,1,2022-01-02,2.00,deposit{extra}\n"
        "3,1,2022-01-03,3.00,purchase\n"
    )
    outcome = ingest_file(warehouse, path, config)
    assert outcome.file_id is not None
    assert rejects_of(warehouse, outcome.file_id) == [(3, "wrong_field_count")]
    ((message, raw),) = warehouse.execute("SELECT message, raw_line FROM rejects").fetchall()
    assert message == f"expected 5 fields, found {5 + extra.count(',')}"
    unquoted = extra.replace('""', "") if quoted else extra  # the record as CSV again
    assert raw == "2,1,2022-01-02,2.00,deposit" + unquoted
    assert (outcome.rows_loaded, outcome.rows_total) == (2, 3)
    assert verify(warehouse) == []


def test_an_empty_last_field_of_the_header_is_still_a_field(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path
) -> None:
    """A header ending with an empty extra column (a spreadsheet's export): rows ending with an
    empty field have the header's count and load, by the fast path."""
    path = tmp_path / "sheet.csv"
    path.write_text(
        "transaction_id,user_id,transaction_date,amount,transaction_type,\n"
        "1,1,2022-01-01,1.00,deposit,\n"
        "2,1,2022-01-02,2.00,deposit,note\n"
    )
    outcome = ingest_file(warehouse, path, config)
    assert (outcome.rows_loaded, outcome.rows_rejected) == (2, 0)
    assert verify(warehouse) == []


@pytest.mark.parametrize("spans_lines", [False, True])
def test_a_file_after_one_with_a_wrong_field_count_takes_the_fast_path_again(
    warehouse: duckdb.DuckDBPyConnection,
    config: Config,
    tmp_path: Path,
    spans_lines: bool,
) -> None:
    """The reader's reject table is emptied once used, or rolled back with the path that
    filled it (a record spanning lines: the reference path): it never holds another file's."""
    from moneylion import ingest

    first_path = CASES_DIR / "row_wrong_field_count.csv"
    if spans_lines:
        first_path = tmp_path / "multiline.csv"
        first_path.write_text(MULTILINE_WITH_WRONG_COUNT)
    first = ingest.ingest_file(warehouse, first_path, config)
    assert first.rejected_by_reason == {"wrong_field_count": 1}

    path = tmp_path / "clean.csv"
    path.write_text(
        "transaction_id,user_id,transaction_date,amount,transaction_type\n"
        "50,1,2022-01-01,1.00,deposit\n"
    )
    clean = ingest.ingest_file(warehouse, path, config, ladders=without(Checked, Reference))
    assert (clean.rows_loaded, clean.rows_rejected) == (1, 0)
    assert verify(warehouse) == []


# Lines of every shape the located path meets: good rows, bad fields, too few or too many
# fields (empty extras too), blank lines of spaces, copies; sometimes a quoted field.
LINE_SHAPES = [
    "{id},{user},2022-01-0{day},{day}.25,deposit",
    "{id},{user},2022-01-0{day},{day}.25,deposit",
    "{id},{user},2022-01-0{day},{day}.25,Purchase",
    "{id},{user},2022-01-0{day},abc,deposit",
    "{id},{user},2022-02-30,1.00,withdrawal",
    "{id},{user},2022-01-0{day},1.00",
    "{id},{user},2022-01-0{day},1.00,deposit,,",
    "{id},{user},2022-01-0{day},1.00,deposit,x",
    "{id}",
    "   ",
    "{id},{user},2022-01-0{day},1.00,deposit",
    # padded fields: the fast checks refuse them, the reference rules trim and accept them
    "{id}, {user},2022-01-0{day},{day}.25 ,deposit",
]
# Stored before the mix, so that its ids may be copies of stored rows or conflict with them.
PRIOR_LINES = ["2,1,2022-01-02,2.25,deposit", "3,2,2022-01-03,1.00,withdrawal"]


@pytest.mark.slow  # a property test: hypothesis runs it many times
@settings(max_examples=40, deadline=None)
@given(
    lines=st.lists(
        st.tuples(
            st.sampled_from(LINE_SHAPES), st.integers(1, 15), st.integers(1, 4), st.integers(1, 9)
        ),
        min_size=1,
        max_size=25,
    ),
    quoting=st.sampled_from(["none", "one line", "two lines"]),
)
def test_located_and_reference_paths_agree_on_any_mix_of_lines(
    lines: list[tuple[str, int, int, int]], quoting: str
) -> None:
    from tempfile import TemporaryDirectory

    from moneylion import ingest, schema

    text = "\n".join(shape.format(id=i, user=u, day=d) for shape, i, u, d in lines)
    if quoting == "one line":  # quotes: lines are still records
        text = text.replace("deposit", '"de,posit"', 1)
    elif quoting == "two lines":  # a record spanning two lines: they are not
        text = text.replace("deposit", '"de\nposit"', 1)
    with TemporaryDirectory() as folder:
        path = Path(folder) / "mix.csv"
        path.write_text("transaction_id,user_id,transaction_date,amount,transaction_type\n" + text)
        config = load_config(environ={}).with_overrides(
            inbox=Path(folder) / "inbox", warehouse=Path(folder) / "w"
        )

        def load(name: str, located: bool) -> tuple[list[tuple[object, ...]], ...]:
            conn = schema.connect(Path(folder) / f"{name}.duckdb")
            prior = Path(folder) / "prior.csv"
            prior.write_text("\n".join([TX_HEADER, *PRIOR_LINES, ""]))
            ingest.ingest_file(conn, prior, config)
            ladders = LADDERS if located else REFERENCE_ONLY
            ingest.ingest_file(conn, path, config, ladders=ladders)
            assert verify(conn) == []
            stored = conn.execute(
                "SELECT * EXCLUDE (file_id) FROM transactions ORDER BY 1"
            ).fetchall()
            rejects = conn.execute(
                "SELECT line_number, reason, message, raw_line FROM rejects ORDER BY 1, 2"
            ).fetchall()
            conn.close()
            return stored, rejects

        assert load("located", True) == load("reference", False)


LONG = "d" * (3 * 1024 * 1024)  # past LINE_MAX_BYTES (2 MiB), in a known column


@pytest.mark.parametrize(
    "lines",
    [
        # one record per line: the located path places DuckDB's over-long line itself
        [
            "1,1,2022-01-01,1.00,deposit",
            f"2,1,2022-01-01,1.00,{LONG}",
            "3,1,2022-01-01,2.00,purchase",
        ],
        # an over-long line of multi-byte characters, and one just under the limit in bytes
        [
            "1,1,2022-01-01,1.00,deposit",
            "2,1,2022-01-01,1.00," + "é" * (1024 * 1024 + 10),
            "3,1,2022-01-01,1.00," + "x" * (2 * 1024 * 1024 - 30),
            "4,1,2022-01-01,2.00,purchase",
        ],
        # a record spanning lines around the long one: only the reference path reads it
        [
            '1,1,2022-01-01,1.00,"deposit"',
            f'2,1,2022-01-01,1.00,"{LONG}"',
            '3,1,2022-01-01,"2.00",purchase',
            '4,1,2022-01-01,2.00,"with\nbreak"',
        ],
    ],
    ids=["plain", "multibyte", "spanning"],
)
def test_a_line_over_the_limit_is_one_reject_whichever_path_reads_it(
    config: Config, tmp_path: Path, lines: list[str]
) -> None:
    from moneylion import ingest, schema

    path = tmp_path / "long.csv"
    header = "transaction_id,user_id,transaction_date,amount,transaction_type"
    path.write_text("\n".join([header, *lines]) + "\n", encoding="utf-8")

    def load(folder: str, ladders: Ladders = LADDERS) -> tuple[object, ...]:
        conn = schema.connect(tmp_path / folder / "w.duckdb")
        outcome = ingest.ingest_file(conn, path, config, ladders=ladders)
        assert verify(conn) == []
        stored = conn.execute("SELECT transaction_id FROM transactions ORDER BY 1").fetchall()
        rejects = conn.execute(
            "SELECT line_number, reason, message, raw_line FROM rejects ORDER BY 1"
        ).fetchall()
        conn.close()
        return outcome.status, stored, rejects

    first = load("first")
    reference = load("reference", REFERENCE_ONLY)
    assert first == reference
    status, _stored, rejects = first
    assert status == "loaded"
    too_long = [(line, str(raw)) for line, reason, _, raw in rejects if reason == "line_too_long"]
    assert [line for line, _ in too_long] == [3]  # just under the limit in bytes: not too long
    assert all(len(raw) < 100 for _, raw in too_long)


def test_a_header_line_over_the_limit_refuses_the_file_without_quoting_it(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path
) -> None:
    path = tmp_path / "wide.csv"
    path.write_text("transaction_id," + "x" * (3 * 1024 * 1024) + "\n1\n")
    outcome = ingest_file(warehouse, path, config)
    assert (outcome.status, outcome.error_reason) == ("failed", "header_too_long")
    assert outcome.error is not None
    assert len(outcome.error) < 200
    assert verify(warehouse) == []


def test_an_unknown_header_is_quoted_short_and_escaped(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path
) -> None:
    path = tmp_path / "odd.csv"
    path.write_text("vm\x1b[31m," + "y" * 500 + "\n1,2\n")
    outcome = ingest_file(warehouse, path, config)
    assert outcome.error_reason == "unknown_header"
    assert outcome.error is not None
    assert "\x1b" not in outcome.error  # escaped, so no terminal control reaches a log or page
    assert "y" * 100 not in outcome.error
    assert verify(warehouse) == []


# --- hostile numbers and long fields ------------------------------------------------------------

# More digits than int() converts (sys.get_int_max_str_digits, 4,300 by default).
HUGE = "9" * 5000
PATHS = ["readers", "reference"]  # DuckDB's reader paths first, or the reference path alone
GOOD_ROWS = {
    FileKind.TRANSACTIONS: [
        {"transaction_id": "1", "user_id": "7", "amount": "10.25", "transaction_type": "deposit"},
        {"transaction_id": "2", "user_id": "8", "amount": "5.50", "transaction_type": "purchase"},
        {"transaction_id": "3", "user_id": "7", "amount": "1.05", "transaction_type": "deposit"},
    ],
    FileKind.USERS: [
        {"user_id": "7", "country": "Chile"},
        {"user_id": "8", "country": "Peru"},
        {"user_id": "9", "country": "Laos"},
    ],
}


def row_text(kind: FileKind, row: dict[str, str]) -> str:
    dates = {"transaction_date": "2024-01-02", "signup_date": "2023-05-06"}
    return ",".join(row.get(column, dates.get(column, "")) for column in COLUMNS[kind])


def file_with(tmp_path: Path, kind: FileKind, middle: str) -> Path:
    """A file of ``kind``: a good row, then ``middle`` (line 3), then two good rows."""
    first, *rest = (row_text(kind, row) for row in GOOD_ROWS[kind])
    path = tmp_path / f"{kind}.csv"
    path.write_text("\n".join([",".join(COLUMNS[kind]), first, middle, *rest]) + "\n", "utf-8")
    return path


def on_path(path: str) -> Ladders:
    return REFERENCE_ONLY if path == "reference" else LADDERS


NUMERIC_FIELDS = [
    (FileKind.TRANSACTIONS, "transaction_id", RejectReason.BAD_INTEGER),
    (FileKind.TRANSACTIONS, "user_id", RejectReason.BAD_INTEGER),
    (FileKind.TRANSACTIONS, "amount", RejectReason.BAD_AMOUNT),
    (FileKind.USERS, "user_id", RejectReason.BAD_INTEGER),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("kind", "column", "reason"), NUMERIC_FIELDS)
def test_a_number_of_5000_digits_rejects_its_row_and_the_good_rows_load(
    warehouse: duckdb.DuckDBPyConnection,
    tmp_path: Path,
    path: str,
    kind: FileKind,
    column: str,
    reason: RejectReason,
) -> None:
    bad = dict(GOOD_ROWS[kind][0], **{column: HUGE})
    if column != "user_id":
        bad["user_id"] = "50"
    if column != "transaction_id" and kind is FileKind.TRANSACTIONS:
        bad["transaction_id"] = "50"
    source = file_with(tmp_path, kind, row_text(kind, bad))
    outcome = ingest_file(warehouse, source, ladders=on_path(path))

    assert (outcome.status, outcome.rows_loaded) == ("loaded", 3)
    assert outcome.rejected_by_reason == {reason: 1}
    ((line, found, message),) = warehouse.execute(
        "SELECT line_number, reason, message FROM rejects"
    ).fetchall()
    assert (line, found) == (3, reason)
    assert len(message) < 200  # a short escaped prefix of the field, not the field
    if kind is FileKind.TRANSACTIONS:
        assert warehouse.execute("SELECT sum(amount) FROM transactions").fetchall() == [
            (Decimal("16.80"),)
        ]
    assert warehouse.execute(f"SELECT count(*) FROM {kind}").fetchall() == [(3,)]
    assert verify(warehouse) == []


@pytest.mark.parametrize(
    ("column", "text", "expected", "value"),
    [
        ("transaction_id", HUGE, RejectReason.BAD_INTEGER, None),
        ("user_id", "-" + HUGE, RejectReason.NON_POSITIVE_ID, None),
        ("user_id", "0" * 5000, RejectReason.NON_POSITIVE_ID, None),
        ("user_id", "0" * 5000 + "42", None, 42),
        ("amount", HUGE, RejectReason.BAD_AMOUNT, None),
        ("amount", HUGE + ".50", RejectReason.BAD_AMOUNT, None),
        ("amount", "-" + HUGE, RejectReason.NON_POSITIVE_AMOUNT, None),
        ("amount", "0." + "0" * 5000, RejectReason.NON_POSITIVE_AMOUNT, None),
        ("amount", "0." + "0" * 5000 + "1", RejectReason.TOO_MANY_DECIMALS, None),
        ("amount", "0" * 5000 + "12.5", None, Decimal("12.5")),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 30 else None,
)
def test_long_digit_strings_are_judged_without_converting_them(
    column: str, text: str, expected: RejectReason | None, value: object
) -> None:
    found, reason, message = parse_field(column, text)
    assert (found, reason) == (value, expected)
    assert len(message) < 200
    fast_ok, _ = duckdb.connect().execute(field_check_sql(column), {"v": text}).fetchall()[0]
    assert not (fast_ok and reason is not None)  # the fast path never passes what is refused


@pytest.mark.parametrize("path", PATHS)
def test_a_400_kb_field_is_rejected_with_a_short_message_and_a_bounded_raw_line(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path, path: str
) -> None:
    config = config.with_overrides(reject_line_bytes=1000)
    line = "50,7,2024-01-02," + "é" * 200_000 + ",deposit"  # 400 KB of two-byte characters
    short = "51,7,2024-01-02,1.00,refund"
    source = file_with(tmp_path, FileKind.TRANSACTIONS, f"{line}\n{short}")
    outcome = ingest_file(warehouse, source, config, ladders=on_path(path))

    assert outcome.rows_loaded == 3
    assert outcome.rejected_by_reason == {"bad_amount": 1, "unknown_type": 1}
    rows = warehouse.execute(
        "SELECT reason, message, raw_line, raw_line_bytes, raw_line_truncated FROM rejects "
        "ORDER BY line_number"
    ).fetchall()
    (_, message, raw, size, cut), (_, _, short_raw, short_size, short_cut) = rows
    assert len(message) < 200
    assert "éééé" in message  # a short prefix is quoted
    assert 997 <= len(raw.encode()) <= 1000  # cut at a character boundary within the bound
    assert line.startswith(raw)
    assert (size, cut) == (len(line.encode()), True)
    assert (short_raw, short_size, short_cut) == (short, len(short), False)
    assert verify(warehouse) == []


@pytest.mark.parametrize("how", ["one_file", "batch"])
def test_a_conflicting_row_with_a_long_field_keeps_a_bounded_raw_line(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path, how: str
) -> None:
    """Rejects decided against other rows (``resolve``, ``resolve_gathered``) are bounded too."""
    from moneylion.batch import ingest_batch, item_of

    long = "10,2023-05-06," + "x" * 400_000
    source = file_with(tmp_path, FileKind.USERS, f"{long}\n10,2023-05-06,Chile")
    if how == "batch":
        (outcome,), _ = ingest_batch(warehouse, [item_of(source, config)], config)
    else:
        outcome = ingest_file(warehouse, source, config)

    assert outcome.rejected_by_reason == {"duplicate_in_file": 2}
    rows = warehouse.execute(
        "SELECT raw_line, raw_line_bytes, raw_line_truncated FROM rejects ORDER BY line_number"
    ).fetchall()
    assert rows == [
        (long[: config.reject_line_bytes], len(long), True),
        ("10,2023-05-06,Chile", 19, False),
    ]
    assert verify(warehouse) == []
