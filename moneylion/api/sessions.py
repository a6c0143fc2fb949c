"""Dashboard logins: a session cookie that expires, that ``/logout`` ends, that is not the token.

A session value is ``base64url(session id, expiry) "." base64url(HMAC)``, the HMAC keyed by
``HMAC(per-process secret, api_token)``: the value cannot be made without the key, changing the
token or restarting the daemon (a new random secret) ends every session, and the MAC is compared
in constant time. Logout adds the session's id to a revoked set, kept in memory until the
session would have expired anyway, so the set never holds more than the logins of one
``session_max_age_seconds``; past ``REVOKED_MAX`` entries the secret is renewed (every session
ends) rather than forgetting a revocation. No session value is ever logged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

REVOKED_MAX = 100_000  # revoked, unexpired sessions kept; past it every session ends instead
_ID_BYTES = 16
_EXPIRY_BYTES = 8
_PURPOSE = b"moneylion dashboard session 2\x00"  # domain separation for the MAC


def _encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _decode(text: str) -> bytes | None:
    if not text.isascii():
        return None
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None


class Sessions:
    """Issue, check and revoke the dashboard's session values for one token, in one process."""

    def __init__(
        self, token: str, max_age_seconds: int, clock: Callable[[], float] = time.time
    ) -> None:
        self._token = token.encode()
        self.max_age_seconds = max_age_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._revoked: dict[bytes, int] = {}  # session id -> its expiry (unix seconds)
        self._key = self._new_key()

    def _new_key(self) -> bytes:
        return hmac.new(secrets.token_bytes(32), self._token, hashlib.sha256).digest()

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, _PURPOSE + payload, hashlib.sha256).digest()

    def issue(self) -> str:
        """A new session value, valid for ``max_age_seconds`` unless revoked first."""
        expiry = int(self._clock()) + self.max_age_seconds
        payload = secrets.token_bytes(_ID_BYTES) + expiry.to_bytes(_EXPIRY_BYTES, "big")
        return f"{_encode(payload)}.{_encode(self._mac(payload))}"

    def _open(self, value: str) -> tuple[bytes, int] | None:
        """(session id, expiry) of a value this process made and that has not expired."""
        encoded_payload, dot, encoded_mac = value.partition(".")
        payload, mac = _decode(encoded_payload), _decode(encoded_mac)
        if not dot or payload is None or mac is None or len(payload) != _ID_BYTES + _EXPIRY_BYTES:
            return None
        if not hmac.compare_digest(mac, self._mac(payload)):
            return None
        expiry = int.from_bytes(payload[_ID_BYTES:], "big")
        if expiry <= self._clock():
            return None
        return payload[:_ID_BYTES], expiry

    def valid(self, value: str) -> bool:
        """Whether ``value`` is a live session: made here, unexpired, not logged out."""
        opened = self._open(value)
        if opened is None:
            return False
        with self._lock:
            return opened[0] not in self._revoked

    def revoke(self, value: str) -> None:
        """End the session ``value`` (logout); a value that is not a live session is ignored."""
        opened = self._open(value)
        if opened is None:
            return
        now = self._clock()
        with self._lock:
            self._revoked = {sid: exp for sid, exp in self._revoked.items() if exp > now}
            self._revoked[opened[0]] = opened[1]
            if len(self._revoked) > REVOKED_MAX:
                self._key = self._new_key()
                self._revoked.clear()
                log.warning("sessions_renewed", extra={"fields": {"revoked_max": REVOKED_MAX}})
