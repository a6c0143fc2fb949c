"""Who may call the API: which hosts it answers for, which origins may change things, and, with
``Config.api_token`` set, who holds the token.

In every mode, ``RequestGuard`` (the first middleware) takes the client's address and scheme
from ``X-Forwarded-For`` / ``X-Forwarded-Proto`` only when the direct peer is one of
``trusted_proxies`` (the rightmost address that is not a trusted proxy is the client); answers
``421 Misdirected Request`` to a ``Host`` that is not allowed (``allowed_hosts``, plus the
loopback names and ``host``: a DNS-rebinding page names its own host) and ``400`` without one,
logging each refused host once; and refuses a request with an unsafe method (anything but GET,
HEAD, OPTIONS) with ``403`` when ``Sec-Fetch-Site`` is ``cross-site`` or ``same-site`` (another
port of the same host is same-site) or ``Origin`` is not the request's own origin (scheme, host
and port of its ``Host``). A request without either header (curl, scripts) passes. Liveness
answers any host (it says only "alive"; probes may name the pod's address).

With a token set, every route but liveness (and the dashboard's login form and its vendored
static files, which hold no data) needs ``Authorization: Bearer <token>`` or a live dashboard
session (``sessions.py``): the session cookie is good for safe methods anywhere, and for unsafe
ones only when the browser says the request is same-origin (``Origin``, checked above, or
``Sec-Fetch-Site: same-origin``); scripts use the bearer token. Tokens and sessions are compared
in constant time. A refusal is ``401`` problem details (the dashboard's pages: its login form,
with status 401) and one log event that never includes what was presented; failed tokens count
towards ``auth_failures_per_minute`` (``lockout.py``), past which they are answered ``429``.
Without a token, ``serve`` refuses any host that is not loopback (``exposure_refusal``).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

from litestar.connection import ASGIConnection
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, HTTPResponseStartEvent, Receive, Scope, Send

from moneylion.api.lockout import AuthFailures
from moneylion.api.sessions import Sessions
from moneylion.config import Config, ConfigError

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
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
DEFAULT_PORTS = {"http": 80, "https": 443}
# Sec-Fetch-Site values an unsafe request may carry: the page's own origin, or the user's own
# action (typed, bookmarked). "same-site" is refused: it includes other ports of the same host.
SITES_ALLOWED = ("same-origin", "none")
REFUSED_HOSTS_LOGGED = 1000  # distinct refused hosts logged; later ones are refused silently
CLIENT_TEXT_LOGGED = 200  # characters kept of a client's header value in a log event
_NAME = re.compile(r"[a-z0-9_](?:[a-z0-9_.-]*[a-z0-9_])?")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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


def token_matches(presented: str, token: str) -> bool:
    """Constant-time comparison (``hmac.compare_digest``) of what a client presented."""
    return hmac.compare_digest(presented.encode(), token.encode())


def is_public(path: str) -> bool:
    """Paths served without a token: liveness, the login form, vendored static files."""
    return path in (LIVENESS_PATH, LOGIN_PATH) or path.startswith(STATIC_PREFIX)


def is_api_path(path: str) -> bool:
    return path.startswith(API_PREFIXES)


# --- hosts and origins -------------------------------------------------------------------------


def split_host(value: str) -> tuple[str, int | None] | None:
    """A ``Host`` header (or an ``allowed_hosts`` entry) as (name, port or None), the name
    lowercased, an IPv6 address in brackets; None when it is not a host name."""
    value = value.strip().lower()
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        try:
            name = f"[{ipaddress.IPv6Address(name)}]"
        except ValueError:
            return None
        if not bracket:
            return None
    elif value.count(":") > 1:  # a bare IPv6 address (as ``host`` may be written)
        try:
            return f"[{ipaddress.IPv6Address(value)}]", None
        except ValueError:
            return None
    else:
        name, colon, rest = value.partition(":")
        rest = colon + rest
        name = name.removesuffix(".")  # "localhost." names the same host
        if not _NAME.fullmatch(name):
            return None
    if not rest:
        return name, None
    digits = rest[1:]
    if not rest.startswith(":") or not (digits.isascii() and digits.isdigit()) or len(digits) > 5:
        return None
    port = int(digits)
    return (name, port) if 0 < port < 65536 else None


def _is_unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_unspecified
    except ValueError:
        return False


def allowed_host_names(config: Config) -> frozenset[tuple[str, int | None]]:
    """The loopback names, ``host`` (unless it is 0.0.0.0 or ::, which no client names) and
    ``allowed_hosts``; an entry without a port allows any port. ConfigError for a bad entry."""
    entries: list[str] = [*LOOPBACK_NAMES, *config.allowed_hosts]
    if not _is_unspecified(config.host):
        entries.append(config.host)
    names = set()
    for entry in entries:
        parsed = split_host(entry)
        if parsed is None:
            raise ConfigError(f"config key 'allowed_hosts' (or 'host'): {entry!r} is not a host")
        names.add(parsed)
    return frozenset(names)


def host_note(config: Config) -> str | None:
    """What ``serve`` says before it starts when the hosts it answers for may surprise (bound to
    every address, only loopback names allowed); ConfigError for a bad host or proxy entry."""
    allowed_host_names(config)
    trusted_networks(config)
    if not _is_unspecified(config.host) or config.allowed_hosts:
        return None
    return (
        f"host {config.host} listens on every address, but only requests naming "
        f"{', '.join(LOOPBACK_NAMES)} are answered (421 otherwise): list the names clients use "
        "in allowed_hosts (config.toml) or MONEYLION_ALLOWED_HOSTS"
    )


def trusted_networks(config: Config) -> tuple[Network, ...]:
    """``trusted_proxies`` as networks (an address is a network of one); ConfigError if bad."""
    networks = []
    for entry in config.trusted_proxies:
        try:
            networks.append(ipaddress.ip_network(entry.strip().strip("[]"), strict=False))
        except ValueError:
            raise ConfigError(
                f"config key 'trusted_proxies': {entry!r} is not an address or network"
            ) from None
    return tuple(networks)


def headers_of(scope: Scope, name: bytes) -> list[str]:
    """Every value of one request header (``name`` in lowercase), decoded as Latin-1."""
    return [value.decode("latin-1") for key, value in scope["headers"] if key == name]


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of one request header, or None."""
    found = headers_of(scope, name)
    return found[0] if found else None


def _origin_of(url: str) -> tuple[str, str, int] | None:
    """An ``Origin`` header as (scheme, host, port); None for ``null`` or anything malformed."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    host = parts.hostname
    if parts.scheme not in DEFAULT_PORTS or not host or parts.path not in ("", "/"):
        return None
    if ":" in host:
        host = f"[{host}]"
    return parts.scheme, host.removesuffix("."), port or DEFAULT_PORTS[parts.scheme]


def own_origin(scope: Scope) -> tuple[str, str, int] | None:
    """The request's own origin: its scheme and the host and port its ``Host`` names."""
    value = header(scope, b"host")
    parsed = split_host(value) if value is not None else None
    scheme = scope.get("scheme", "http")
    if parsed is None or scheme not in DEFAULT_PORTS:
        return None
    name, port = parsed
    return scheme, name, port or DEFAULT_PORTS[scheme]


def cross_origin(scope: Scope) -> str | None:
    """Why this unsafe request must be refused as sent from another site, or None."""
    site = header(scope, b"sec-fetch-site")
    if site is not None and site.strip().lower() not in SITES_ALLOWED:
        return f"Sec-Fetch-Site is {site.strip()[:40]!r}"
    origin = header(scope, b"origin")
    if origin is not None:
        sent = _origin_of(origin)
        if sent is None or sent != own_origin(scope):
            return f"Origin {origin[:CLIENT_TEXT_LOGGED]!r} is not this site's own origin"
    return None


def client_address(scope: Scope) -> str:
    """The client's address as the guard resolved it (``-`` when the server gave none)."""
    client = scope.get("client")
    return str(client[0]) if client else "-"


def _as_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None


def forwarded_client(
    peer: str, forwarded_for: Iterable[str], trusted: tuple[Network, ...]
) -> str | None:
    """The client behind trusted proxies: walking ``X-Forwarded-For`` from the right, the first
    hop that is not a trusted proxy (earlier hops are the client's own claims). None when the
    peer is not trusted (then the header is ignored) or names no hop."""

    def is_trusted(address: str) -> bool:
        parsed = _as_address(address)
        return parsed is not None and any(parsed in network for network in trusted)

    if not trusted or not is_trusted(peer):
        return None
    hops = [hop.strip() for value in forwarded_for for hop in value.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not is_trusted(hop):
            parsed = _as_address(hop)
            return str(parsed) if parsed is not None else hop[:100]
    return hops[0] if hops else None


async def send_problem(
    send: Send, status: int, detail: str, headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    """Answer problem details (RFC 9457) with ``status`` from a middleware."""
    body = json.dumps(
        {
            "type": "about:blank",
            "title": HTTPStatus(status).phrase,
            "status": status,
            "detail": detail,
        }
    ).encode()
    await _send(send, status, body, b"application/problem+json", headers)


async def _send(
    send: Send,
    status: int,
    body: bytes,
    media_type: bytes,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    start: HTTPResponseStartEvent = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", media_type),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
            *headers,
        ],
    }
    await send(start)
    await send({"type": "http.response.body", "body": body, "more_body": False})


class RequestGuard(ASGIMiddleware):
    """The first middleware: the client behind trusted proxies, the Host allow-list (421/400)
    and the same-origin rule for unsafe methods (403), in every mode."""

    scopes = (ScopeType.HTTP,)

    def __init__(self, config: Config) -> None:
        self.allowed = allowed_host_names(config)
        self.trusted = trusted_networks(config)
        self.refused_hosts: set[str] = set()

    def host_allowed(self, name: str, port: int | None, scheme: str) -> bool:
        default = DEFAULT_PORTS.get(scheme)
        ports = {port, None} if port is not None else {None, default}
        return any((name, p) in self.allowed for p in ports)

    def resolve_client(self, scope: Scope) -> None:
        """Behind a trusted proxy: the client's address and scheme as the proxy forwarded them."""
        client = scope.get("client")
        if not self.trusted or not client:
            return
        address = forwarded_client(
            str(client[0]), headers_of(scope, b"x-forwarded-for"), self.trusted
        )
        if address is None:
            return
        scope["client"] = (address, 0)
        proto = headers_of(scope, b"x-forwarded-proto")
        scheme = proto[-1].rsplit(",", 1)[-1].strip().lower() if proto else ""
        if scheme in DEFAULT_PORTS:
            scope["scheme"] = scheme

    def host_refusal(self, scope: Scope) -> tuple[int, str] | None:
        """(status, detail) when the request's Host is missing, repeated or not allowed."""
        hosts = headers_of(scope, b"host")
        if len(hosts) != 1:
            return 400, "the request must name exactly one Host"
        parsed = split_host(hosts[0])
        if parsed is not None and self.host_allowed(*parsed, scope.get("scheme", "http")):
            return None
        shown = hosts[0][:CLIENT_TEXT_LOGGED]
        if shown not in self.refused_hosts and len(self.refused_hosts) < REFUSED_HOSTS_LOGGED:
            self.refused_hosts.add(shown)
            log.warning(
                "host_refused",
                extra={
                    "fields": {
                        "host": shown,
                        "status": 421,
                        "config_key": "allowed_hosts",
                        "hint": "if clients reach this daemon by that name, add it to "
                        "allowed_hosts (config.toml) or MONEYLION_ALLOWED_HOSTS",
                    }
                },
            )
        return 421, (
            f"this server does not answer for the host {shown!r}: its operator lists the names "
            "it answers for in allowed_hosts"
        )

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        self.resolve_client(scope)
        method = scope.get("method", "GET")
        if not (scope["path"] == LIVENESS_PATH and method in SAFE_METHODS):
            refused = self.host_refusal(scope)
            if refused is not None:
                await send_problem(send, *refused)
                return
        if method not in SAFE_METHODS:
            why = cross_origin(scope)
            if why is not None:
                log.info(
                    "cross_origin_refused",
                    extra={
                        "fields": {
                            "method": method,
                            "path": scope["path"],
                            "why": why,
                            "client": client_address(scope),
                        }
                    },
                )
                await send_problem(
                    send,
                    403,
                    f"{why}: a request that changes something must come from this site's own "
                    "pages (scripts send no Origin header)",
                )
                return
        await next_app(scope, receive, send)


# --- the token ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Access:
    """What guards a token-protected daemon: the token, the dashboard's sessions and the count
    of failed attempts per client."""

    token: str
    sessions: Sessions
    failures: AuthFailures

    @classmethod
    def from_config(cls, config: Config) -> Access:
        return cls(
            token=config.api_token,
            sessions=Sessions(config.api_token, config.session_max_age_seconds),
            failures=AuthFailures(config.auth_failures_per_minute),
        )


LoginPage = Callable[[str, int, str | None], str]


class TokenMiddleware(ASGIMiddleware):
    """Answers 401 (429 past the failure limit) to any HTTP request without the token or a live
    session, and 403 to a session's unsafe request the browser does not mark same-origin."""

    scopes = (ScopeType.HTTP,)

    def __init__(self, access: Access, login_page: LoginPage) -> None:
        """``login_page(next_path, status, error)``: the dashboard's login form as HTML."""
        self.access = access
        self.login_page = login_page

    def credentials(self, scope: Scope) -> tuple[str, bool]:
        """(what was presented: bearer, cookie, malformed or none; whether it is valid)."""
        connection: ASGIConnection[Any, Any, Any, Any] = ASGIConnection(scope)
        value = connection.headers.get("authorization")
        if value is not None:
            scheme, _, token = value.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return "malformed", False
            return "bearer", token_matches(token.strip(), self.access.token)
        cookie = connection.cookies.get(SESSION_COOKIE)
        if cookie is not None:
            return "cookie", self.access.sessions.valid(cookie)
        return "none", False

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        path = scope["path"]
        if is_public(path):
            await next_app(scope, receive, send)
            return
        presented, valid = self.credentials(scope)
        method = scope.get("method", "GET")
        if valid and presented == "cookie" and method not in SAFE_METHODS:
            # A cross-origin Origin was refused by RequestGuard; here the browser must have
            # said where the request comes from at all (real browsers send Origin on POST).
            same = (header(scope, b"sec-fetch-site") or "").strip().lower() == "same-origin"
            if header(scope, b"origin") is None and not same:
                self.log_refusal(scope, presented, 403)
                await send_problem(
                    send,
                    403,
                    "the session cookie changes nothing without the browser's Origin header: "
                    "scripts send Authorization: Bearer <api_token>",
                )
                return
        if valid:
            await next_app(scope, receive, send)
            return
        # Guesses at the token count towards the limit; a stale cookie (expired, logged out,
        # from before a restart) or none at all is no guess.
        retry = None
        if presented in ("bearer", "malformed"):
            retry = self.access.failures.refuse(client_address(scope))
        status = 401 if retry is None else 429
        self.log_refusal(scope, presented, status)
        headers = [(b"www-authenticate", b'Bearer realm="moneylion"')]
        if retry is not None:
            headers.append((b"retry-after", str(retry).encode()))
        if is_api_path(path):
            detail = "send Authorization: Bearer <api_token>"
            if retry is not None:
                detail = f"too many failed tokens from this address: try again in {retry} s"
            await send_problem(send, status, detail, headers)
            return
        query = scope.get("query_string", b"").decode("latin-1")
        error = None if retry is None else too_many_failures(retry)
        body = self.login_page(path + (f"?{query}" if query else ""), status, error).encode()
        headers.append((b"content-security-policy", PAGE_POLICY.encode()))
        await _send(send, status, body, b"text/html; charset=utf-8", headers)

    def log_refusal(self, scope: Scope, presented: str, status: int) -> None:
        log.info(
            "api_unauthorized" if status != 403 else "session_cross_origin_refused",
            extra={
                "fields": {
                    "method": scope.get("method"),
                    "path": scope["path"],
                    "presented": presented,  # the kind only, never the value
                    "status": status,
                    "client": client_address(scope),
                }
            },
        )


def too_many_failures(retry_after: int) -> str:
    """What the login form says to a client past ``auth_failures_per_minute``."""
    return f"Too many failed attempts from this address: try again in {retry_after} s."
