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
from typing import Any, overload

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


@dataclass(frozen=True)
class Config:
    """Resolved settings; paths are absolute."""

    inbox: Path
    warehouse: Path
    host: str = "127.0.0.1"
    port: int = 8000
    duckdb_memory_limit: str = "1GB"
    duckdb_threads: int = 2
    ingest_nice: int = 19
    log_level: str = "INFO"
    log_max_bytes: int = 10 * 1024 * 1024
    log_backups: int = 5
    settle_seconds: float = 0.5  # a file not known complete must be quiet this long, at two looks
    writer_timeout_seconds: float = 60.0  # the longest a file held open for writing is waited for
    empty_file_seconds: float = 60.0  # a file still empty this long is refused as empty
    continuation_seconds: float = 300.0  # a taken file is tailed this long after it goes quiet
    rescan_seconds: float = 10.0  # how often the inbox and the tailed files are looked at anyway
    top_users_kept: int = 1000
    sqlite_export: bool = True
    max_file_bytes: int = 0  # larger inbox files are refused unread (too_large); 0: no limit
    # A compressed file inflating past this is refused while it is read (too_large); 0: no limit.
    max_decompressed_bytes: int = 16 * 1024**3
    # Past 1 GiB inflated, more than this many bytes out per byte in is refused (compression_ratio).
    max_compression_ratio: int = 1000
    min_free_disk_bytes: int = 1024**3  # staging never leaves the warehouse's disk with less free
    reject_line_bytes: int = 4096  # a refused row's raw_line is kept up to this many bytes
    # A transaction dated more than this many days after its file's arrival day is refused.
    max_future_days: int = 1
    batch_max_files: int = 1000  # files committed together in one transaction, at most
    batch_max_rows: int = 200_000  # records of a batch, at most (past it the rest waits)
    batch_max_bytes: int = 64 * 1024 * 1024  # bytes of a batch, at most
    batch_file_max_bytes: int = 1024 * 1024  # larger files are ingested alone (fast paths)
    order_wait_seconds: float = 2.0  # how long an unfinished file holds back later ones
    done_retention_days: int = 0  # loaded files kept in done/<day>/ this many days; 0: always
    # Bearer token every route but liveness requires; "" (unset) is allowed on loopback only.
    api_token: str = dataclasses.field(default="", repr=False)
    max_upload_bytes: int = 64 * 1024 * 1024  # larger bodies of POST /v1/files answer 413
    # Host header values answered besides the loopback names and ``host``. Others: 421.
    allowed_hosts: list[str] = dataclasses.field(default_factory=list)
    # Addresses (or networks) whose X-Forwarded-For names the client; empty: trust none.
    trusted_proxies: list[str] = dataclasses.field(default_factory=list)
    session_max_age_seconds: int = 12 * 3600  # a dashboard login lasts this long (logout ends it)
    auth_failures_per_minute: int = 10  # past this, a client's failed logins/tokens answer 429
    request_head_seconds: float = 10.0  # a request's line and headers must arrive within this
    request_body_min_rate: int = 1024  # bytes per second a body must keep up (over 10 s windows)
    max_connections: int = 256  # open HTTP connections; past it only liveness is answered
    umask: str = "027"  # the daemon's file mode mask: warehouse files unreadable to other users
    # Lake mode (moneylion/lake/): a shared Delta Lake's URI; "" (unset): local mode.
    lake_uri: str = ""
    # delta-rs storage options (s3://...: credentials, endpoint, locking), passed through as is.
    lake_storage_options: dict[str, str] = dataclasses.field(default_factory=dict, repr=False)
    lake_poll_seconds: float = 0.2  # how often a replica looks for other daemons' commits
    lake_maintenance_seconds: float = 60.0  # how often a daemon compacts and checkpoints
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
