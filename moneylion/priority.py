"""CPU priority of the daemon's background threads: ingest and export yield to the API.

Linux keeps a nice value per thread, and threads a thread starts inherit it: DuckDB's worker
threads, started from a nicer thread, are nicer too. Elsewhere nothing changes.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

from moneylion.config import NICEST

log = logging.getLogger(__name__)


def lower_thread_priority(nice: int) -> None:
    """Make the calling thread ``nice`` steps nicer (0: unchanged)."""
    if nice <= 0 or not sys.platform.startswith("linux"):
        return
    thread = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(NICEST, current + nice))
    except OSError as exc:  # a sandbox may refuse it: run at the same priority
        log.warning("priority_unchanged", extra={"fields": {"nice": nice, "error": str(exc)}})
