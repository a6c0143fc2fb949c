"""README.md's reference tables, made from their declarations, so that they cannot drift.

``python -m moneylion.docs_tables`` (``make docs``) rewrites README.md in place; ``--check``
only says which tables differ (exit 1). ``tests/test_docs.py`` fails while one does.

Each table sits between two markers, the only text of README.md written here::

    <!-- BEGIN generated: config-keys (make docs) -->
    <!-- END generated: config-keys -->

The markers may be indented (a table inside a list item): the table is indented alike.

* ``config-keys``: the fields of ``config.Config`` but ``NOT_KEYS``, each with its ``doc``;
  the default is what a config file without that key gives.
* ``reject-reasons``: ``rules.REJECT_REASONS``, one row per ``RejectReason``.
* ``file-failures``: ``errors.FILE_FAILURES``, one row per ``FileFailure``.
* ``cli-commands``: the parser of ``cli.build_parser``: every command, its arguments, their help.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import TypeVar

README = Path(__file__).resolve().parent.parent / "README.md"

_BEGIN = re.compile(
    r"^(?P<indent>[ \t]*)<!-- BEGIN generated: (?P<name>[a-z-]+) \(make docs\) -->\n", re.M
)


def _end_marker(name: str) -> str:
    return f"<!-- END generated: {name} -->"


# --- the tables -------------------------------------------------------------------------------


def _cell(text: str) -> str:
    """Text as one table cell: on one line, its pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def _row(*cells: str) -> str:
    return "| " + " | ".join(_cell(cell) for cell in cells) + " |"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [_row(*head), "|" + "---|" * len(head), *(_row(*row) for row in rows)]


def _default(value: object, base: Path) -> str:
    """A key's default as a config file would write it; a string bare unless it is empty or
    would read as a number."""
    if isinstance(value, Path):
        text = value.relative_to(base).as_posix()
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value) if not value or _reads_as_number(value) else value
    elif isinstance(value, (list, dict)):
        text = json.dumps(value)
    else:
        text = str(value)
    return f"`{text}`"


def _reads_as_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def config_keys() -> list[str]:
    from moneylion.config import NOT_KEYS, Config, load_config

    # An empty config file in an empty folder: the dataclass's defaults, and the folders that
    # load_config places beside the file.
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder).resolve()
        defaults = load_config(base / "config.toml", environ={})
    rows = []
    for field in dataclasses.fields(Config):
        if field.name in NOT_KEYS:
            continue
        doc = field.metadata.get("doc")
        if not doc:
            raise ValueError(f"config key {field.name!r} has no doc (its field's metadata)")
        rows.append((f"`{field.name}`", _default(getattr(defaults, field.name), base), doc))
    return _table(("key", "default", "meaning"), rows)


Reason = TypeVar("Reason", bound=Enum)


def _reasons(members: type[Reason], meanings: Mapping[Reason, str], where: str) -> list[str]:
    missing = [member.value for member in members if member not in meanings]
    if missing:
        raise ValueError(f"{where} has no meaning for {missing}")
    return _table(
        ("reason", "meaning"), [(f"`{member.value}`", meanings[member]) for member in members]
    )


def reject_reasons() -> list[str]:
    from moneylion.rules import REJECT_REASONS, RejectReason

    return _reasons(RejectReason, REJECT_REASONS, "rules.REJECT_REASONS")


def file_failures() -> list[str]:
    from moneylion.errors import FILE_FAILURES, FileFailure

    return _reasons(FileFailure, FILE_FAILURES, "errors.FILE_FAILURES")


def commands(
    parser: argparse.ArgumentParser, words: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser, str]]:
    """Every command that runs (``lake status``, not ``lake``): its words, its parser, its help."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
                    yield from commands(sub, (*words, name))
                else:
                    yield (*words, name), sub, helps[name]


def _arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        action
        for action in parser._actions
        if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))
    ]


def _usage(action: argparse.Action) -> str:
    """How an argument is written: ``FILE...``, ``--json``, ``--last N``."""
    metavar = action.metavar if isinstance(action.metavar, str) else action.dest.upper()
    if not action.option_strings:
        return {"+": f"{metavar}...", "*": f"[{metavar}...]", "?": f"[{metavar}]"}.get(
            str(action.nargs), metavar
        )
    option = max(action.option_strings, key=len)
    return option if action.nargs == 0 else f"{option} {metavar}"


def _synopsis(action: argparse.Action) -> str:
    usage = _usage(action)
    return usage if action.required or not action.option_strings else f"[{usage}]"


def _meaning(action: argparse.Action) -> str:
    text = f"`{_usage(action)}`: {action.help or ''}"
    if action.option_strings and action.nargs != 0 and action.default is not None:
        text += f" (default {action.default})"
    return text


def cli_commands() -> list[str]:
    from moneylion.cli import build_parser

    parser = build_parser()
    every = "; ".join(_meaning(action) for action in _arguments(parser))
    rows = []
    for words, sub, help_text in commands(parser):
        arguments = _arguments(sub)
        synopsis = " ".join([*words, *(_synopsis(action) for action in arguments)])
        rows.append(
            (f"`{synopsis}`", help_text, "; ".join(_meaning(action) for action in arguments))
        )
    return [
        f"Options before the command: {every}.",
        "",
        *_table(("command", "what it does", "arguments"), rows),
    ]


TABLES: dict[str, Callable[[], list[str]]] = {
    "config-keys": config_keys,
    "reject-reasons": reject_reasons,
    "file-failures": file_failures,
    "cli-commands": cli_commands,
}


# --- README.md's regions ----------------------------------------------------------------------


def regions(text: str) -> dict[str, tuple[int, int, str]]:
    """Each generated region of ``text``: where its body starts and ends, its indent."""
    found: dict[str, tuple[int, int, str]] = {}
    for begin in _BEGIN.finditer(text):
        name, indent = begin["name"], begin["indent"]
        if name not in TABLES:
            raise ValueError(f"README region {name!r}: no such table (known: {sorted(TABLES)})")
        if name in found:
            raise ValueError(f"README region {name!r} appears twice")
        end = text.find(f"{indent}{_end_marker(name)}\n", begin.end())
        if end < 0:
            raise ValueError(f"README region {name!r}: no {_end_marker(name)!r} after it")
        found[name] = (begin.end(), end, indent)
    missing = sorted(set(TABLES) - set(found))
    if missing:
        raise ValueError(f"README has no region for {missing}")
    return found


def region_texts(text: str) -> dict[str, str]:
    """Each region's body as ``text`` has it."""
    return {name: text[start:end] for name, (start, end, _) in regions(text).items()}


def body(name: str, indent: str = "") -> str:
    """A region's body as generated now: the table between blank lines, indented."""
    lines = ["", *TABLES[name](), ""]
    return "".join(f"{indent}{line}\n" if line else "\n" for line in lines)


def render(text: str) -> str:
    """``text`` with every generated region made afresh (the rest as it is)."""
    out, at = [], 0
    for name, (start, end, indent) in sorted(regions(text).items(), key=lambda item: item[1]):
        out += [text[at:start], body(name, indent)]
        at = end
    return "".join([*out, text[at:]])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moneylion.docs_tables", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--check", action="store_true", help="only report; exit 1 if stale")
    parser.add_argument("readme", nargs="?", type=Path, default=README, help="default: README.md")
    args = parser.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    fresh = render(text)
    before, after = region_texts(text), region_texts(fresh)
    stale = [name for name in TABLES if before[name] != after[name]]
    if not stale:
        print(f"{args.readme.name}: up to date")
        return 0
    if args.check:
        print(f"{args.readme.name}: stale {', '.join(stale)} (run `make docs`)", file=sys.stderr)
        return 1
    args.readme.write_text(fresh, encoding="utf-8")
    print(f"{args.readme.name}: rewrote {', '.join(stale)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
