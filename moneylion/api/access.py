"""Who may call the API once it leaves loopback: the holder of ``Config.api_token``.

With a token set, every route but liveness (and the dashboard's login form and its vendored
static files, which hold no data) needs ``Authorization: Bearer <token>`` or the dashboard's
session cookie, whose value is an HMAC of the token (the cookie never carries the token itself).
Both are compared in constant time. A refusal is ``401`` problem details (the dashboard's pages:
its login form, with status 401) and one log event that never includes what was presented.
Without a token, ``serve`` refuses any host that is not loopback (``exposure_refusal``).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
from collections.abc import Callable
from typing import Any

from litestar.connection import ASGIConnection
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, HTTPResponseStartEvent, Receive, Scope, Send

from moneylion.config import Config

log = logging.getLogger(__name__)

LIVENESS_PATH = "/v1/health/live"
LOGIN_PATH = "/login"
STATIC_PREFIX = "/static/"
SESSION_COOKIE = "moneylion_session"
# The dashboard's pages load what they use from this origin only, with no inline script or style.
PAGE_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
# Paths of the machine-facing API; everything else is a dashboard page answered in HTML.
API_PREFIXES = ("/v1/", "/api/", "/metrics", "/schema")


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the API on this machine (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_refusal(config: Config) -> str | None:
    """Why ``serve`` must not start with this config (a non-loopback host, no token), or None."""
    if config.api_token or is_loopback(config.host):
        return None
    return (
        f"refusing to serve on {config.host}:{config.port} without an api_token: anyone who "
        "reaches that address could read the warehouse and upload files. Set api_token in "
        "config.toml or MONEYLION_API_TOKEN (16 characters or more), or bind host to 127.0.0.1."
    )


def session_value(token: str) -> str:
    """The dashboard cookie's value for ``token``: an HMAC, so the cookie is not the token."""
    return hmac.new(token.encode(), b"moneylion dashboard session 1", hashlib.sha256).hexdigest()


def token_matches(presented: str, token: str) -> bool:
    """Constant-time comparison (``hmac.compare_digest``) of what a client presented."""
    return hmac.compare_digest(presented.encode(), token.encode())


def is_public(path: str) -> bool:
    """Paths served without a token: liveness, the login form, vendored static files."""
    return path in (LIVENESS_PATH, LOGIN_PATH) or path.startswith(STATIC_PREFIX)


def is_api_path(path: str) -> bool:
    return path.startswith(API_PREFIXES)


class TokenMiddleware(ASGIMiddleware):
    """Answers 401 to any HTTP request without the token or the session cookie."""

    scopes = (ScopeType.HTTP,)

    def __init__(self, token: str, login_page: Callable[[str, int], str]) -> None:
        """``login_page(next_path, status)``: the dashboard's login form as HTML."""
        self.token = token
        self.session = session_value(token)
        self.login_page = login_page

    def credentials(self, scope: Scope) -> tuple[str, bool]:
        """(what was presented: bearer, cookie, malformed or none; whether it is valid)."""
        connection: ASGIConnection[Any, Any, Any, Any] = ASGIConnection(scope)
        header = connection.headers.get("authorization")
        if header is not None:
            scheme, _, value = header.partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                return "malformed", False
            return "bearer", token_matches(value.strip(), self.token)
        cookie = connection.cookies.get(SESSION_COOKIE)
        if cookie is not None:
            return "cookie", token_matches(cookie, self.session)
        return "none", False

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        path = scope["path"]
        if is_public(path):
            await next_app(scope, receive, send)
            return
        presented, valid = self.credentials(scope)
        if valid:
            await next_app(scope, receive, send)
            return
        client = scope.get("client")
        log.info(
            "api_unauthorized",
            extra={
                "fields": {
                    "method": scope.get("method"),
                    "path": path,
                    "presented": presented,  # the kind only, never the value
                    "client": f"{client[0]}:{client[1]}" if client else None,
                }
            },
        )
        if is_api_path(path):
            body = json.dumps(
                {
                    "type": "about:blank",
                    "title": "Unauthorized",
                    "status": 401,
                    "detail": "send Authorization: Bearer <api_token>",
                }
            ).encode()
            media_type = b"application/problem+json"
        else:
            query = scope.get("query_string", b"").decode("latin-1")
            body = self.login_page(path + (f"?{query}" if query else ""), 401).encode()
            media_type = b"text/html; charset=utf-8"
        headers = [
            (b"content-type", media_type),
            (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b'Bearer realm="moneylion"'),
            (b"cache-control", b"no-store"),
        ]
        if not is_api_path(path):
            headers.append((b"content-security-policy", PAGE_POLICY.encode()))
        start: HTTPResponseStartEvent = {
            "type": "http.response.start",
            "status": 401,
            "headers": headers,
        }
        await send(start)
        await send({"type": "http.response.body", "body": body, "more_body": False})
