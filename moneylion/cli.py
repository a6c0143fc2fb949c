"""``moneylion serve / ingest / check / verify / status / export / retract / restore / release /
lake status / generate``: thin, over the library."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from moneylion.config import Config, ConfigError, load_config
from moneylion.errors import DiskLow
from moneylion.remote import DaemonUnreachable
from moneylion.schema import WarehouseLocked


def _config(args: argparse.Namespace) -> Config:
    """The config, with the process's umask set from it: every command that loads it may
    create warehouse files (the database and its WAL, the export, logs, the staging folder)."""
    config = load_config(Path(args.config) if args.config else None)
    overrides = {}
    if getattr(args, "warehouse", None):
        overrides["warehouse"] = args.warehouse
    if getattr(args, "inbox", None):
        overrides["inbox"] = args.inbox
    config = config.with_overrides(**overrides) if overrides else config
    os.umask(config.umask_bits)
    return config


def _received_at(text: str) -> dt.datetime:
    """``--received-at``: an ISO 8601 date-time, as the ledger stores it (UTC, without a zone,
    like ``db.utc_now``). One with a zone is converted to UTC; one without is taken as UTC."""
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 date-time (e.g. 2024-05-01T09:30:00+02:00)"
        ) from None
    if when.tzinfo is not None:
        when = when.astimezone(dt.UTC).replace(tzinfo=None)
    return when


def cmd_ingest(args: argparse.Namespace) -> int:
    """Local mode: each file in its own transaction (``ingest.ingest_file``); lake mode:
    published to the lake, which stamps each file's arrival itself."""
    from moneylion.ingest import ingest_file
    from moneylion.schema import open_warehouse

    config = _config(args)
    if config.lake_uri:
        if args.received_at is not None:
            print("moneylion: --received-at is not available in lake mode", file=sys.stderr)
            return 2
        return _publish_to_lake(config, [Path(name) for name in args.files])
    failed = 0
    with open_warehouse(config) as conn:
        if not args.quiet and sys.stdout.isatty():
            # DuckDB's own progress bar shows how far a long file's read has got.
            conn.execute("SET enable_progress_bar = true")
        for name in args.files:
            path = Path(name)
            progress = _progress_printer(path) if not args.quiet else None
            outcome = ingest_file(
                conn, path, config, progress=progress, received_at=args.received_at
            )
            print(outcome.summary())
            failed += outcome.status == "failed"
    return 1 if failed else 0


def _publish_to_lake(config: Config, paths: list[Path]) -> int:
    """Lake mode: the files go to the lake (a daemon's replica applies them), never straight
    into the local warehouse."""
    from moneylion.lake.publish import LakePublisher
    from moneylion.lake.tailer import lake_for

    config.staging_dir.mkdir(parents=True, exist_ok=True)
    lake = lake_for(config)
    lake.create()
    publisher = LakePublisher(lake, config)
    failed = 0
    for path in paths:
        outcome = publisher.publish_paths([path], config)[0]
        print(outcome.summary())
        failed += outcome.status == "failed"
    return 1 if failed else 0


def _progress_printer(path: Path) -> Callable[[str], None]:
    def report(stage: str) -> None:
        print(f"  {path.name}: {stage}", file=sys.stderr, flush=True)

    return report


def cmd_verify(args: argparse.Namespace) -> int:
    """``aggregates.verify``: exit 1 on any difference."""
    from moneylion.aggregates import verify
    from moneylion.schema import open_warehouse

    config = _config(args)
    with open_warehouse(config) as conn:
        differences = verify(conn, top_users_kept=config.top_users_kept)
    for line in differences:
        print(line)
    if differences:
        print(f"verify: {len(differences)} difference(s)", file=sys.stderr)
        return 1
    print("verify: aggregates equal a full recompute")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """``ingest.warehouse_status``, as text or JSON."""
    from moneylion.ingest import warehouse_status
    from moneylion.schema import open_warehouse

    with open_warehouse(_config(args)) as conn:
        status = warehouse_status(conn, last=args.last)
    if args.json:
        print(json.dumps(status, indent=2, default=str))
        return 0
    counts = status["counts"]
    print(
        f"users {counts['users']}  transactions {counts['transactions']}  "
        f"files {counts['files']} (failed {counts['files_failed']})  rejects {counts['rejects']}"
    )
    for row in status["last_files"]:
        print(
            f"  #{row['file_id']:<6} {row['status']:<7} {row['kind'] or '-':<12} "
            f"loaded {row['rows_loaded']:<9} duplicate {row['rows_duplicate']:<7} "
            f"rejected {row['rows_rejected']:<7} {row['name']}"
        )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """``generate.generate``: prints the paths written."""
    from moneylion.generate import generate

    written = generate(
        Path(args.out),
        users=args.users,
        transactions=args.transactions,
        bad_rate=args.bad_rate,
        seed=args.seed,
    )
    for path in written:
        print(path)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``export.run_export``."""
    from moneylion.export import run_export

    return run_export(_config(args), full=args.full)


def cmd_serve(args: argparse.Namespace) -> int:
    """``daemon.serve``, once the config's exposure is checked (exit 2 if refused)."""
    from moneylion.api.access import exposure_refusal, host_note
    from moneylion.daemon import serve

    config = _config(args)
    refusal = exposure_refusal(config)
    if refusal is not None:
        print(f"moneylion: {refusal}", file=sys.stderr)
        return 2
    note = host_note(config)  # ConfigError (exit 2) for a bad allowed_hosts or trusted_proxies
    if note is not None:
        print(f"moneylion: {note}", file=sys.stderr)
    return serve(config)


def cmd_correct(args: argparse.Namespace) -> int:
    """``retract`` / ``restore`` / ``replace`` / ``release``: on the warehouse itself when no
    daemon holds it, else through the daemon's API (``remote``). Exit 1 when refused."""
    from moneylion import remote
    from moneylion.corrections import CorrectionRefused
    from moneylion.schema import open_warehouse

    config = _config(args)
    action = args.command
    if config.lake_uri:  # a replica changed alone would drift from the others
        print(
            f"moneylion {action}: in lake mode a correction is a commit of the lake's ledger: "
            f"ask a running daemon (POST /v1/files/{{id}}/{action})",
            file=sys.stderr,
        )
        return 2
    try:
        conn = open_warehouse(config)
    except WarehouseLocked:
        status, answer = _correct_through_daemon(config, args, remote)
        if status != 200:
            print(f"moneylion {action}: {answer.get('detail', answer)}", file=sys.stderr)
            return 1
        print(
            f"file #{answer['file_id']} ({answer['kind']}): {action} done by the daemon, now "
            f"{answer['status']}; {answer['rows_out']} rows out, {answer['rows_in']} rows in, "
            f"{answer['files_changed']} other files' verdicts changed"
        )
        return 0
    with conn:
        try:
            done = _correct_here(conn, config, args)
        except CorrectionRefused as refused:
            print(f"moneylion {action}: {refused}", file=sys.stderr)
            return 1
    print(done.summary())
    return 0


def _correct_here(conn: Any, config: Config, args: argparse.Namespace) -> Any:
    """The correction ``args`` name, on the warehouse ``conn``."""
    from moneylion import corrections
    from moneylion.release import release
    from moneylion.source import Bounds, stage

    if args.command == "release":
        return release(conn, args.file, config, args.reason)
    if args.command == "replace":
        staged = stage(Path(args.new_file), config.staging_dir, bounds=Bounds.of(config))
        try:
            return corrections.replace(conn, args.file, staged, config, args.reason)
        finally:
            staged.discard()
    what = corrections.RETRACT if args.command == "retract" else corrections.RESTORE
    return corrections.correct(
        conn, what, args.file, args.reason, config.top_users_kept, config.reject_line_bytes
    )


def _correct_through_daemon(
    config: Config, args: argparse.Namespace, remote: Any
) -> tuple[int, dict[str, Any]]:
    """The correction ``args`` name, asked of the daemon that holds the warehouse."""
    import urllib.parse

    path = f"/v1/files/{urllib.parse.quote(args.file)}/{args.command}"
    if args.command != "replace":
        body = json.dumps({"reason": args.reason}).encode()
        return remote.call(config, path, body=body)  # type: ignore[no-any-return]
    new_file = Path(args.new_file)
    query = {"name": new_file.name, **({"reason": args.reason} if args.reason else {})}
    return remote.call(  # type: ignore[no-any-return]
        config,
        f"{path}?{urllib.parse.urlencode(query)}",
        body=new_file.read_bytes(),
        content_type="text/csv",
    )


def cmd_check(args: argparse.Namespace) -> int:
    """``check.check_file``: on the warehouse itself when no daemon holds it, else through the
    daemon's API (``POST /v1/checks``). Exit 1 when the file would be held or fail."""
    import urllib.parse

    import msgspec

    from moneylion import remote
    from moneylion.check import check_file, summary_lines
    from moneylion.schema import open_warehouse

    config = _config(args)
    path = Path(args.file)
    try:
        conn = open_warehouse(config)
    except WarehouseLocked:
        size = path.stat().st_size
        if size > config.max_check_bytes:
            print(
                f"moneylion check: {path.name} holds {size} bytes, more than the daemon's "
                f"max_check_bytes ({config.max_check_bytes})",
                file=sys.stderr,
            )
            return 1
        query = urllib.parse.urlencode({"name": path.name})
        status, report = remote.call(
            config, f"/v1/checks?{query}", body=path.read_bytes(), content_type="text/csv"
        )
        if status != 200:
            print(f"moneylion check: {report.get('detail', report)}", file=sys.stderr)
            return 1
    else:
        with conn:
            report = msgspec.to_builtins(check_file(conn, path, config))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print("\n".join(summary_lines(report)))
    return 1 if report["outcome"] in ("would_hold", "would_fail") else 0


def cmd_lake_status(args: argparse.Namespace) -> int:
    """``lake.status``, as text or JSON; exit 2 in local mode."""
    from moneylion.lake.status import format_status, lake_status

    config = _config(args)
    if not config.lake_uri:
        print("moneylion: lake_uri is not set (local mode)", file=sys.stderr)
        return 2
    report = lake_status(config)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print("\n".join(format_status(report)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line, built without running anything: its help is the README's table of
    commands (``make docs``)."""
    parser = argparse.ArgumentParser(prog="moneylion", description=__doc__)
    parser.add_argument(
        "--config", metavar="FILE", help="config file (default: config.toml of the project)"
    )
    parser.add_argument(
        "--warehouse", metavar="DIR", help="warehouse directory (overrides the config)"
    )
    parser.add_argument("--inbox", metavar="DIR", help="inbox directory (overrides the config)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="the daemon: watcher, ingest worker, SQLite exporter and API in one process",
    )
    serve.set_defaults(func=cmd_serve)

    ingest = commands.add_parser(
        "ingest",
        help="ingest files by hand; prints per file its kind, rows loaded, duplicate, rejected "
        "by reason, seconds",
    )
    ingest.add_argument(
        "files", nargs="+", metavar="FILE", help="CSV files of users or transactions"
    )
    ingest.add_argument("--quiet", action="store_true", help="no progress lines")
    ingest.add_argument(
        "--received-at",
        type=_received_at,
        metavar="TIME",
        help="when the files arrived (default: now), ISO 8601: with a zone it is converted to "
        "UTC, without one it is taken as UTC. The ledger's `received_at` and the day "
        "`future_date` counts from: a replay of `done/` decides as the first run did. "
        "Local mode only",
    )
    ingest.set_defaults(func=cmd_ingest)

    check = commands.add_parser(
        "check",
        help="what ingesting a file now would do (outcome, rows, rejects by reason, the totals "
        "it changes), keeping nothing; exit 1 if it would be held or fail (through the daemon's "
        "API when it runs)",
    )
    check.add_argument("file", metavar="FILE", help="a CSV file of users or transactions")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(func=cmd_check)

    verify = commands.add_parser(
        "verify",
        help="recomputes every aggregate from the base tables, prints any difference, exits 1 "
        "on a mismatch",
    )
    verify.set_defaults(func=cmd_verify)

    status = commands.add_parser("status", help="row counts and the last files of the ledger")
    status.add_argument(
        "--last", type=int, default=10, metavar="N", help="how many recent files to list"
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=cmd_status)

    export = commands.add_parser(
        "export", help="brings `warehouse/moneylion.sqlite` up to date with the warehouse"
    )
    export.add_argument("--full", action="store_true", help="rebuild it, atomically")
    export.set_defaults(func=cmd_export)

    # The corrections (cmd_correct): each names a file of the ledger and may say why.
    through = " (through the daemon's API when it runs)"
    for name, text, reason_required in (
        ("retract", "take a loaded file out of the warehouse, as if it had never arrived", True),
        ("restore", "undo a retraction: the file is back in its place in the order", False),
        (
            "release",
            "load a file held by max_reject_share, as if it arrived now, from its bytes in `held/`",
            False,
        ),
        (
            "replace",
            "put NEW_FILE in the place of a loaded file: the warehouse becomes the ledger with "
            "the old bytes swapped for the new ones",
            False,
        ),
    ):
        correction = commands.add_parser(name, help=text + through)
        correction.add_argument("file", metavar="ID|SHA256", help="the file's ledger id or sha256")
        if name == "replace":
            correction.add_argument(
                "new_file", metavar="NEW_FILE", help="the CSV file that replaces it"
            )
        correction.add_argument(
            "--reason", required=reason_required, help="why (kept in the ledger)"
        )
        correction.set_defaults(func=cmd_correct)

    lake = commands.add_parser("lake", help="lake mode: the shared Delta Lake")
    lake_commands = lake.add_subparsers(dest="lake_command", required=True, metavar="COMMAND")
    lake_status = lake_commands.add_parser(
        "status",
        help="lake mode: each Delta table's version, data files, bytes, rows, and this "
        "replica's lag behind it",
    )
    lake_status.add_argument("--json", action="store_true", help="print JSON")
    lake_status.set_defaults(func=cmd_lake_status)

    generate = commands.add_parser(
        "generate",
        help="deterministic synthetic data shaped like the seed's, optionally with bad rows of "
        "every reason",
    )
    generate.add_argument(
        "out", metavar="OUT", help="the folder users.csv and transactions.csv are written in"
    )
    generate.add_argument("--users", type=int, default=10_000, metavar="N", help="how many users")
    generate.add_argument(
        "--transactions", type=int, default=100_000, metavar="M", help="how many transactions"
    )
    generate.add_argument(
        "--bad-rate", type=float, default=0.0, metavar="R", help="share of bad rows, 0..1"
    )
    generate.add_argument(
        "--seed", type=int, default=0, metavar="S", help="the same seed writes the same files"
    )
    generate.set_defaults(func=cmd_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"moneylion: {exc}", file=sys.stderr)
        return 2
    except WarehouseLocked as exc:
        print(f"moneylion: {exc}", file=sys.stderr)
        return 3
    except DaemonUnreachable as exc:
        print(f"moneylion: {exc}", file=sys.stderr)
        return 3
    except DiskLow as exc:  # the file is left as it is: run again once there is room
        print(f"moneylion: {exc}", file=sys.stderr)
        return 1
