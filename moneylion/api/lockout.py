"""A limit on failed token attempts per client address: past it, further failures answer 429.

Only failures count, and only failures are refused: a request with the right token (or a live
session) is never answered 429, so a proxy or a loopback address shared with an attacker cannot
lock the operator out. A client may fail ``auth_failures_per_minute`` times in any sliding
minute; a further failure within that minute is answered ``429 Too Many Requests`` with
``Retry-After`` (the seconds until its oldest counted failure leaves the window) and is not
counted. Each lockout is logged once (``auth_locked_out``), however long the failures go on; it
ends when a whole minute passes without one. IPv6 clients are counted per /64
(one host usually holds a whole /64). At most ``MAX_CLIENTS`` addresses are tracked, the least
recently failing forgotten first, so the memory is bounded whatever the number of addresses.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import math
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

WINDOW_SECONDS = 60.0
MAX_CLIENTS = 10_000


def client_key(address: str) -> str:
    """The address failures are counted under: an IPv6 address's /64, any other as it is."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address[:100]
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:  # ::ffff:a.b.c.d is the IPv4 client a.b.c.d
            return str(parsed.ipv4_mapped)
        return str(ipaddress.IPv6Network((parsed, 64), strict=False))
    return str(parsed)


class _Client:
    __slots__ = ("failures", "logged")

    def __init__(self, limit: int) -> None:
        self.failures: collections.deque[float] = collections.deque(maxlen=limit)
        self.logged = False  # this lockout has been logged


class AuthFailures:
    """Failed token attempts per client over the last ``WINDOW_SECONDS``."""

    def __init__(
        self,
        per_minute: int,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        """``per_minute``: failures allowed in any minute; 0: no limit."""
        self.per_minute = per_minute
        self._clock = clock
        self._max_clients = max_clients
        self._clients: collections.OrderedDict[str, _Client] = collections.OrderedDict()
        self._lock = threading.Lock()

    def refuse(self, address: str) -> int | None:
        """Note a failed attempt from ``address``. None: answer it as a failure (401), it was
        counted; else it is past the limit: answer 429 with this many seconds to wait."""
        if self.per_minute <= 0:
            return None
        key = client_key(address)
        now = self._clock()
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                client = self._clients[key] = _Client(self.per_minute)
                if len(self._clients) > self._max_clients:
                    self._clients.popitem(last=False)
            self._clients.move_to_end(key)
            failures = client.failures
            while failures and failures[0] <= now - WINDOW_SECONDS:
                failures.popleft()
            if not failures:
                client.logged = False  # a minute without failures: a later lockout is new
            if len(failures) < self.per_minute:
                failures.append(now)
                return None
            retry_after = max(1, math.ceil(failures[0] + WINDOW_SECONDS - now))
            first = not client.logged
            client.logged = True
        if first:
            log.warning(
                "auth_locked_out",
                extra={
                    "fields": {
                        "client": key,
                        "failures": self.per_minute,
                        "seconds": WINDOW_SECONDS,
                        "retry_after": retry_after,
                        "config_key": "auth_failures_per_minute",
                    }
                },
            )
        return retry_after
