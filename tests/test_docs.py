"""README.md's reference tables equal what their declarations make (``make docs`` rewrites
them), and name every key, reason and command there is."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from moneylion import docs_tables
from moneylion.cli import build_parser
from moneylion.config import NOT_KEYS, Config
from moneylion.errors import FileFailure
from moneylion.rules import RejectReason


def _readme_regions() -> dict[str, str]:
    return docs_tables.region_texts(docs_tables.README.read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", sorted(docs_tables.TABLES))
def test_the_readme_table_is_what_its_declarations_make(name: str) -> None:
    readme = docs_tables.README.read_text(encoding="utf-8")
    written = docs_tables.region_texts(readme)[name]
    made = docs_tables.region_texts(docs_tables.render(readme))[name]
    assert written == made, (
        f"README.md's {name!r} table differs from its declarations: run `make docs`"
    )


def _commands(parser: argparse.ArgumentParser, words: str = "") -> list[str]:
    """Every command's words, ``lake`` and ``lake status`` alike (independent of the generator)."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += [f"{words}{name}", *_commands(sub, f"{words}{name} ")]
    return found


def test_every_key_reason_and_command_is_in_the_readme() -> None:
    regions = _readme_regions()
    keys = [f.name for f in dataclasses.fields(Config) if f.name not in NOT_KEYS]
    expected = {
        "config-keys": [f"| `{key}` |" for key in keys],
        "reject-reasons": [f"| `{reason}` |" for reason in RejectReason],
        "file-failures": [f"| `{reason}` |" for reason in FileFailure],
        "cli-commands": [f"| `{command}" for command in _commands(build_parser())],
    }
    missing = {
        name: [cell for cell in cells if cell not in regions[name]]
        for name, cells in expected.items()
    }
    assert missing == {name: [] for name in expected}, "run `make docs`"
    assert "max_future_days" in keys
    assert "lake status" in _commands(build_parser())


def test_a_reason_without_its_meaning_is_refused() -> None:
    with pytest.raises(ValueError, match=r"FILES has no meaning for \['empty', "):
        docs_tables._reasons(FileFailure, {}, "FILES")


def test_defaults_are_written_as_a_config_file_would() -> None:
    cells = [line.split(" | ") for line in docs_tables.config_keys() if line.startswith("| `")]
    rows = {key.removeprefix("| "): default for key, default, _ in cells}
    assert rows["`inbox`"] == "`inbox`"
    assert rows["`host`"] == "`127.0.0.1`"
    assert rows["`duckdb_memory_limit`"] == "`1GB`"
    assert rows["`umask`"] == '`"027"`'
    assert rows["`api_token`"] == '`""`'
    assert rows["`allowed_hosts`"] == "`[]`"
    assert rows["`lake_storage_options`"] == "`{}`"
    assert rows["`sqlite_export`"] == "`true`"
    assert rows["`settle_seconds`"] == "`0.5`"
    assert rows["`max_future_days`"] == "`1`"


def test_regeneration_keeps_the_rest_of_the_text_and_the_indent() -> None:
    stale = (
        "intro\n"
        "- a bullet\n\n"
        "  <!-- BEGIN generated: reject-reasons (make docs) -->\n"
        "  a stale table\n"
        "  <!-- END generated: reject-reasons -->\n"
        "middle\n"
        + "".join(
            f"<!-- BEGIN generated: {name} (make docs) -->\n<!-- END generated: {name} -->\n"
            for name in ("config-keys", "file-failures", "cli-commands")
        )
        + "outro\n"
    )
    fresh = docs_tables.render(stale)
    assert fresh.startswith("intro\n- a bullet\n\n  <!-- BEGIN generated: reject-reasons")
    assert "\n  | `missing_field` | " in fresh
    assert "stale" not in fresh
    assert fresh.endswith("<!-- END generated: cli-commands -->\noutro\n")
    assert docs_tables.render(fresh) == fresh


def test_a_missing_or_unknown_region_is_an_error() -> None:
    with pytest.raises(ValueError, match="no region for"):
        docs_tables.regions("nothing here\n")
    with pytest.raises(ValueError, match="no such table"):
        docs_tables.regions("<!-- BEGIN generated: nope (make docs) -->\n")
    with pytest.raises(ValueError, match="no '<!-- END generated: config-keys -->'"):
        docs_tables.regions("<!-- BEGIN generated: config-keys (make docs) -->\n")
