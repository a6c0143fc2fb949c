"""config.toml -> one frozen dataclass, with MONEYLION_* environment overrides.

This is the only module that reads the environment; everything else receives a ``Config``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, overload

from moneylion.errors import MoneylionError
from moneylion.tuning import Tuning

ENV_PREFIX = "MONEYLION_"
DEFAULT_CONFIG_FILE = Path(__file__).resolve().parent.parent / "config.toml"
NICEST = 19  # the lowest CPU priority Linux gives a thread
MIN_TOKEN_LENGTH = 16  # a shorter api_token is refused (guessable)
NOT_KEYS = ("tuning",)  # Config fields no config file or variable sets


class ConfigError(MoneylionError, ValueError):
    """A config key is unknown or has a value of the wrong type."""


class _Below:
    """A read-only path attribute: a fixed name below one of the configured folders."""

    def __init__(self, folder: str, name: str) -> None:
        self.folder = folder
        self.name = name

    @overload
    def __get__(self, config: None, owner: type) -> _Below: ...
    @overload
    def __get__(self, config: object, owner: type) -> Path: ...
    def __get__(self, config: object | None, owner: type) -> Path | _Below:
        if config is None:
            return self
        folder: Path = getattr(config, self.folder)
        return folder / self.name


_T = TypeVar("_T")


def _key(default: _T, doc: str, *, secret: bool = False) -> _T:
    """A config key's field: its default and its meaning, ``doc`` (README's table of keys is
    made from these: ``make docs``); a ``secret`` one is kept out of the repr (logs,
    tracebacks). The keys without a default, or with a list or dict one, declare their
    ``doc`` in ``dataclasses.field`` themselves."""
    return dataclasses.field(default=default, metadata={"doc": doc}, repr=not secret)


@dataclass(frozen=True)
class Config:
    """Resolved settings; paths are absolute."""

    inbox: Path = dataclasses.field(
        metadata={
            "doc": "where CSV files are dropped; `done/`, `failed/` and `held/` are made inside it"
        }
    )
    warehouse: Path = dataclasses.field(
        metadata={"doc": "holds `moneylion.duckdb`, `moneylion.sqlite` and `logs/`"}
    )
    host: str = _key(
        "127.0.0.1", "the address the API listens on (loopback unless you front it with a proxy)"
    )
    port: int = _key(8000, "the port the API listens on")
    duckdb_memory_limit: str = _key("1GB", "DuckDB's memory limit")
    duckdb_threads: int = _key(2, "DuckDB's threads")
    ingest_nice: int = _key(
        19,
        "how many nice steps the daemon's ingest and export threads (DuckDB's workers included) "
        "run below the API, so that queries stay fast during a large ingest (figures in "
        "docs/performance.md). An idle machine gives the ingest all of its CPU anyway; on a "
        "machine busy with other work, a large value slows the ingest down. Linux; ignored "
        "elsewhere",
    )
    log_level: str = _key("INFO", "console and file log level")
    log_max_bytes: int = _key(
        10 * 1024 * 1024, "`warehouse/logs/moneylion.log` is rotated when it reaches this size"
    )
    log_backups: int = _key(5, "how many rotated files of the log are kept")
    settle_seconds: float = _key(
        0.5,
        "a file not known complete (no close or rename seen) must be quiet this long and "
        "unchanged at two looks this far apart",
    )
    writer_timeout_seconds: float = _key(
        60.0,
        "the longest a file still open for writing is waited for; then the settle rule decides "
        "(later bytes are tailed)",
    )
    empty_file_seconds: float = _key(
        60.0, "a file still empty this long after its last event is refused as `empty`"
    )
    continuation_seconds: float = _key(
        300.0,
        "how long a taken file is tailed after it goes quiet: bytes written into it later load "
        "as its next part (`0`: off)",
    )
    rescan_seconds: float = _key(
        10.0,
        "how often the inbox and the recently taken files are looked at without an event",
    )
    top_users_kept: int = _key(
        1000, "how many ranked users are maintained (the largest `/v1/users/top?limit=`)"
    )
    sqlite_export: bool = _key(
        True, "keep `warehouse/moneylion.sqlite` up to date after every file"
    )
    max_file_bytes: int = _key(
        0, "inbox files larger than this are refused unread (`too_large`); `0`: no limit"
    )
    max_decompressed_bytes: int = _key(
        16 * 1024**3,
        "a compressed file whose CSV passes this (16 GiB) is refused while it inflates "
        "(`too_large`); `0`: no limit",
    )
    max_compression_ratio: int = _key(
        1000,
        "past 1 GiB inflated, more bytes out per compressed byte than this is refused "
        "(`compression_ratio`); `0`: no limit",
    )
    min_free_disk_bytes: int = _key(
        1024**3,
        "staging never leaves the warehouse's disk with less free (1 GiB): a file that would "
        "waits in the inbox (`disk_low`); `0`: no check",
    )
    reject_line_bytes: int = _key(
        4096,
        "a refused row's raw line is kept up to this many bytes (`raw_line_truncated`, "
        "`raw_line_bytes`)",
    )
    max_future_days: int = _key(
        1,
        "a transaction dated more than this many days after its file's arrival day (UTC) is "
        "refused as `future_date`",
    )
    batch_max_files: int = _key(
        1000, "files of one micro-batch (they commit in one transaction), at most"
    )
    batch_max_rows: int = _key(
        200_000, "records of one micro-batch, at most (past it the rest waits)"
    )
    batch_max_bytes: int = _key(64 * 1024 * 1024, "bytes of one micro-batch, at most")
    batch_file_max_bytes: int = _key(
        1024 * 1024, "larger files are ingested alone, by the fast paths"
    )
    max_reject_share: float = _key(
        0.0,
        "a file whose refused rows pass this share of its rows (`0.5`: more than half) loads "
        "nothing: it is `held` (its rejects are kept, the file goes to `held/`) until "
        "`moneylion release` loads it; `0`: off",
    )
    order_wait_seconds: float = _key(
        2.0, "the longest a file that is not ready holds back the files behind it"
    )
    done_retention_days: int = _key(
        0,
        "`done/`'s day folders older than this are removed (checked hourly; `held/` never); "
        "`0`: keep",
    )
    api_token: str = _key(
        "",
        "bearer token every route but liveness requires (see [Security](#security)); unset: "
        "loopback only. Prefer `MONEYLION_API_TOKEN` to writing it in the file",
        secret=True,
    )
    max_upload_bytes: int = _key(
        64 * 1024 * 1024, "`POST /v1/files` bodies over this many bytes (64 MiB) answer 413"
    )
    max_check_bytes: int = _key(
        64 * 1024 * 1024, "`POST /v1/checks` bodies over this many bytes (64 MiB) answer 413"
    )
    allowed_hosts: list[str] = dataclasses.field(
        default_factory=list,
        metadata={
            "doc": "`Host` names answered besides `localhost`, `127.0.0.1`, `[::1]` and `host` "
            "(`name`: any port, `name:port`: that port); others 421"
        },
    )
    trusted_proxies: list[str] = dataclasses.field(
        default_factory=list,
        metadata={
            "doc": "proxies (addresses or networks) whose `X-Forwarded-For` / `-Proto` are "
            "believed; empty: nobody's"
        },
    )
    session_max_age_seconds: int = _key(
        12 * 3600, "how long a dashboard login lasts; `/logout` ends it at once"
    )
    auth_failures_per_minute: int = _key(
        10,
        "failed tokens per client address in any minute before further failures answer 429; "
        "`0`: no limit",
    )
    request_head_seconds: float = _key(
        10.0, "a request's line and headers must arrive within this (then 408); `0`: no limit"
    )
    request_body_min_rate: int = _key(
        1024,
        "bytes per second a request body must keep up, over 10 s windows (then 408); `0`: no limit",
    )
    max_connections: int = _key(
        256,
        "open HTTP connections served; past it only `/v1/health/live` is answered (503 "
        "otherwise); `0`: no limit",
    )
    umask: str = _key(
        "027",
        "mode mask of every file the daemon creates (`027`: no access for other users; `022`: "
        "readable by all)",
    )
    lake_uri: str = _key(
        "",
        "lake mode: the shared Delta Lake (a path, relative to the config file, or `s3://…`); "
        "unset: local mode. See [Several daemons on one lake](#several-daemons-on-one-lake)",
    )
    lake_storage_options: dict[str, str] = dataclasses.field(
        default_factory=dict,
        repr=False,
        metadata={
            "doc": "delta-rs storage options for an object store (`s3://…`: credentials, "
            "endpoint, locking), passed through as they are (TOML table; JSON in the environment)"
        },
    )
    lake_poll_seconds: float = _key(
        0.2, "how often a replica looks for other daemons' ledger commits"
    )
    lake_maintenance_seconds: float = _key(
        60.0, "how often a daemon compacts the lake's small files and checkpoints its log"
    )
    # Not a key: how the work is done, never what it gives (moneylion/tuning.py).
    tuning: Tuning = dataclasses.field(default_factory=Tuning, repr=False)

    duckdb_path = _Below("warehouse", "moneylion.duckdb")
    sqlite_path = _Below("warehouse", "moneylion.sqlite")
    # Private copies of the inbox files being ingested (what every reader reads).
    staging_dir = _Below("warehouse", "staging")
    # Uploads being received: hidden (the watcher ignores it), on the inbox's filesystem so a
    # finished upload is renamed into the inbox whole.
    uploads_dir = _Below("inbox", ".uploads")
    log_dir = _Below("warehouse", "logs")
    done_dir = _Below("inbox", "done")
    failed_dir = _Below("inbox", "failed")
    # Files held by max_reject_share, kept for `moneylion release` (never pruned).
    held_dir = _Below("inbox", "held")

    @property
    def umask_bits(self) -> int:
        return int(self.umask, 8)

    def with_overrides(self, **changes: Any) -> Config:
        """A copy with some fields replaced (paths made absolute)."""
        for key in ("inbox", "warehouse"):
            if key in changes:
                changes[key] = Path(changes[key]).resolve()
        return dataclasses.replace(self, **changes)


def _coerce(name: str, raw: Any, target: Any) -> Any:
    """Turn a TOML or environment value into the field's type, or raise ConfigError."""
    try:
        if target in (Path, "Path"):
            return Path(raw)
        if target in (bool, "bool"):
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if target in (int, "int"):
            if isinstance(raw, bool):
                raise ValueError(raw)
            return int(raw)
        if target in (float, "float"):
            return float(raw)
        if target == "list[str]":  # a TOML array, or comma-separated in the environment
            found = raw.split(",") if isinstance(raw, str) else raw
            if not isinstance(found, list):
                raise ValueError(raw)
            return [str(item).strip() for item in found if str(item).strip()]
        if target == "dict[str, str]":  # a TOML table, or JSON in the environment
            found = json.loads(raw) if isinstance(raw, str) else raw
            if not isinstance(found, dict):
                raise ValueError(raw)
            return {str(key): str(value) for key, value in found.items()}
        return str(raw)
    except ValueError as exc:  # json.JSONDecodeError included
        raise ConfigError(f"config key {name!r}: cannot use {raw!r} as {target}") from exc


def load_config(
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Read ``config.toml`` (or ``path``), apply ``MONEYLION_*`` overrides, resolve paths."""
    config_file = Path(path) if path is not None else DEFAULT_CONFIG_FILE
    environ = os.environ if environ is None else environ
    if path is None and f"{ENV_PREFIX}CONFIG" in environ:
        config_file = Path(environ[f"{ENV_PREFIX}CONFIG"])
    values: dict[str, Any] = {}
    if config_file.exists():
        with config_file.open("rb") as handle:
            values = tomllib.load(handle)
    base = config_file.resolve().parent
    fields = {f.name: f.type for f in dataclasses.fields(Config) if f.name not in NOT_KEYS}
    unknown = set(values) - set(fields)
    if unknown:
        raise ConfigError(f"unknown config keys in {config_file}: {sorted(unknown)}")
    for name in fields:
        env_value = environ.get(ENV_PREFIX + name.upper())
        if env_value is not None:
            values[name] = env_value
    values.setdefault("inbox", "inbox")
    values.setdefault("warehouse", "warehouse")
    typed = {name: _coerce(name, raw, fields[name]) for name, raw in values.items()}
    for key in ("inbox", "warehouse"):
        typed[key] = (base / typed[key]).resolve()
    lake = typed.get("lake_uri", "")
    if lake and "://" not in lake:  # a path: relative to this file, like the others
        typed["lake_uri"] = str((base / lake).resolve())
    if typed.get("max_future_days", 0) < 0:
        raise ConfigError(
            f"config key 'max_future_days': {typed['max_future_days']} is negative "
            "(0: no transaction dated after its file's arrival day)"
        )
    share = typed.get("max_reject_share", 0.0)
    if not 0 <= share <= 1:  # NaN included
        raise ConfigError(
            f"config key 'max_reject_share': {share} is not a share in (0, 1] "
            "(0.5: hold a file when more than half of its rows are refused; 0: off)"
        )
    if typed.get("max_check_bytes", 1) < 1:
        raise ConfigError(
            f"config key 'max_check_bytes': {typed['max_check_bytes']} is not a positive size"
        )
    if not 0 <= typed.get("ingest_nice", 0) <= NICEST:
        raise ConfigError(f"config key 'ingest_nice': {typed['ingest_nice']} is not in 0..{NICEST}")
    try:
        if not 0 <= int(typed.get("umask", "027"), 8) <= 0o777:
            raise ValueError
    except ValueError:
        raise ConfigError(
            f"config key 'umask': {typed['umask']!r} is not an octal mode mask"
        ) from None
    token = typed.get("api_token", "")
    if token and (len(token) < MIN_TOKEN_LENGTH or token != token.strip()):
        raise ConfigError(
            f"config key 'api_token': use at least {MIN_TOKEN_LENGTH} characters, "
            "without surrounding spaces"
        )
    return Config(**typed)
