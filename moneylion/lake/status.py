"""``moneylion lake status``: the lake's tables (version, data files, bytes, rows) and how far
this daemon's replica is behind each of them.

A table's lag is what the lake holds that the replica does not yet: for ``files`` the ledger
versions and files not applied, for the row tables the rows of those files (as their readers
counted them). The replica's mark is read from the local warehouse, or, while a daemon holds
it, from that daemon's ``/v1/health/ready``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import httpx

from moneylion.config import Config
from moneylion.lake.apply import MARK_DDL, Mark
from moneylion.lake.store import Lake
from moneylion.lake.tables import ROW_TABLES
from moneylion.model import FileKind
from moneylion.schema import WarehouseLocked, open_warehouse


def replica_mark(config: Config) -> tuple[Mark | None, str]:
    """The local replica's mark and where it was read (None: no replica here yet)."""
    try:
        conn = open_warehouse(config)
    except WarehouseLocked:
        with contextlib.suppress(httpx.HTTPError, KeyError, TypeError, ValueError):
            answer = httpx.get(
                f"http://{config.host}:{config.port}/v1/health/ready",
                headers={"Authorization": f"Bearer {config.api_token}"} if config.api_token else {},
                timeout=5.0,
            ).json()["lake"]
            return Mark(int(answer["applied_version"]), int(answer["applied_files"])), "daemon"
        return None, "locked"
    try:
        conn.execute(MARK_DDL)
        rows = conn.execute("SELECT version, file_id FROM lake_applied").fetchall()
    finally:
        conn.close()
    return (Mark(int(rows[0][0]), int(rows[0][1])) if rows else Mark()), "warehouse"


def lake_status(config: Config) -> dict[str, Any]:
    lake = Lake(config.lake_uri, dict(config.lake_storage_options) or None)
    if not lake.exists():
        return {"lake": lake.uri, "exists": False}
    tables = lake.status()
    mark, source = replica_mark(config)
    ledger = lake.ledger_since(-1)
    files = ledger.num_rows
    report: dict[str, Any] = {
        "lake": lake.uri,
        "exists": True,
        "files": files,
        "tables": tables,
        "replica": source,
    }
    if mark is None:
        return report
    # A file id another writer left out is not behind (the replica skips that row).
    behind = [r for r in ledger.to_pylist() if (r["file_id"] or 0) > mark.file_id]
    report["applied"] = {"version": mark.version, "file_id": mark.file_id}
    tables["files"]["lag"] = {
        "versions": max(0, tables["files"]["version"] - mark.version),
        "rows": len(behind),
    }
    for kind in FileKind:
        rows = sum(r["rows_loaded"] or 0 for r in behind if r["kind"] == str(kind))
        tables[ROW_TABLES[kind]]["lag"] = {"rows": rows}
    tables["rejects"]["lag"] = {"rows": sum(r["rows_rejected"] or 0 for r in behind)}
    return report


def format_status(report: dict[str, Any]) -> list[str]:
    if not report["exists"]:
        return [f"lake {report['lake']}: no lake there yet"]
    lines = [f"lake {report['lake']}: {report['files']} files in the ledger"]
    applied = report.get("applied")
    if applied is not None:
        lines.append(
            f"replica ({report['replica']}): applied through version {applied['version']}, "
            f"file #{applied['file_id']}"
        )
    else:
        lines.append(f"replica: unknown ({report['replica']})")
    for name, table in report["tables"].items():
        lag = table.get("lag")
        behind = ""
        if lag is not None:
            versions = f"{lag['versions']} versions, " if "versions" in lag else ""
            behind = f"  lag {versions}{lag['rows']} rows"
        lines.append(
            f"  {name:<13} version {table['version']:<6} files {table['files']:<5} "
            f"{table['bytes']:>12} bytes  {table['rows']:>10} rows{behind}"
        )
    return lines
