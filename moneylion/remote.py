"""The running daemon's API, for the commands that change data while it holds the warehouse.

DuckDB lets one process open the warehouse for writing: with the daemon running, ``moneylion
retract`` (and the other corrections, and ``check``) find it locked and ask the daemon instead,
over its HTTP API on this machine, with the configured token if one is set.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from moneylion.config import Config
from moneylion.errors import MoneylionError

TIMEOUT_SECONDS = 600.0  # a correction of a large file takes as long as its ingest


class DaemonUnreachable(MoneylionError, RuntimeError):
    """The warehouse is locked and its daemon's API does not answer."""


def base_url(config: Config) -> str:
    """The daemon's API as this machine reaches it (a wildcard address through loopback)."""
    wildcard = ("0.0.0.0", "::", "")  # noqa: S104 - the addresses a listener may name
    host = config.host if config.host not in wildcard else "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config.port}"


def call(
    config: Config, path: str, *, body: bytes = b"", content_type: str = "application/json"
) -> tuple[int, dict[str, Any]]:
    """POST ``body`` to ``path`` of the daemon's API; (HTTP status, the JSON answer)."""
    # Always http://host:port built above: never a scheme from outside.
    request = urllib.request.Request(  # noqa: S310
        base_url(config) + path,
        data=body,
        method="POST",
        headers={"Content-Type": content_type, "Accept": "application/json"},
    )
    if config.api_token:
        request.add_header("Authorization", f"Bearer {config.api_token}")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as answer:  # noqa: S310
            return answer.status, json.loads(answer.read() or b"{}")
    except urllib.error.HTTPError as error:
        text = error.read()
        try:
            return error.code, json.loads(text or b"{}")
        except ValueError:
            return error.code, {"detail": text.decode("utf-8", "replace")}
    except (urllib.error.URLError, OSError) as error:
        raise DaemonUnreachable(
            f"the warehouse is in use and the daemon's API at {base_url(config)} does not "
            f"answer ({error})"
        ) from error
