"""The HTTP server's own bounds, below the application: a request head's size and time, a
request body's pace, and the number of open connections.

uvicorn's httptools protocol has none of these: it buffers a head without a limit, waits for a
head or a body forever, and its ``limit_concurrency`` answers 503 to everything, liveness
included. ``BoundedHttpProtocol`` adds them; the application never sees a request refused here.

- Head size: the request line and headers are at most ``HEAD_MAX_BYTES``, else ``431`` (``414``
  for the request line alone). Bytes that arrive while a head is incomplete are counted too, so
  a single endless header is cut off after at most one read beyond the limit.
- Head time: a head must arrive whole within ``request_head_seconds``, counted from the
  connection's opening, or from the first byte after the previous request's body; else ``408``,
  or a bare close when not one byte came.
- Body pace: a body must bring ``request_body_min_rate`` bytes per second over each window of
  ``BODY_WINDOW_SECONDS``, else ``408`` (a bare close when the application already answered).
  Only time the server reads counts: while uvicorn pauses reading because the application does
  not consume the body yet, the client is not to blame.
- Connections: past ``max_connections`` open ones, a connection is still accepted but only
  liveness is answered on it (anything else: ``503`` with ``Retry-After``), with a shorter head
  time; past ``CONNECTION_RESERVE`` more, a new connection is closed at once.

Refusals are problem details with ``connection: close``.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from moneylion.api.access import LIVENESS_PATH
from moneylion.config import Config

log = logging.getLogger(__name__)

HEAD_MAX_BYTES = 64 * 1024  # request line and headers together
READ_MAX_BYTES = 256 * 1024  # asyncio's largest read: what one data_received may hold
LINGER_SECONDS = 1.0  # after a refusal, how long the rest of the request is read and dropped
BODY_WINDOW_SECONDS = 10.0  # a body's pace is judged over windows of this much reading time
CONNECTION_RESERVE = 16  # connections past max_connections still accepted, for liveness only
OVER_BOUND_HEAD_SECONDS = 2.0  # the head time of a connection past max_connections, at most
BOUND_CLEARS_AT = 0.75  # the bound is over once open connections fall to this share of it
RETRY_AFTER_SECONDS = 5  # what a 503 past max_connections tells the client to wait


@dataclass(frozen=True)
class HttpLimits:
    """The server's bounds (``Config``'s keys; 0 turns one off)."""

    head_seconds: float
    body_min_rate: int
    max_connections: int
    body_window_seconds: float = BODY_WINDOW_SECONDS

    @classmethod
    def from_config(cls, config: Config) -> HttpLimits:
        return cls(
            head_seconds=config.request_head_seconds,
            body_min_rate=config.request_body_min_rate,
            max_connections=config.max_connections,
        )


class Admission(enum.Enum):
    """What a new connection may do."""

    SERVED = "served"
    LIVENESS_ONLY = "liveness_only"  # past max_connections
    CLOSED = "closed"  # past max_connections + CONNECTION_RESERVE


class ConnectionGate:
    """One server's open connections, counted by its protocols, and the bound on them."""

    def __init__(self, limits: HttpLimits) -> None:
        self.limits = limits
        self.open = 0
        self.refused = 0  # 503s and connections closed at once, since the server started
        self._saturated = False
        self._refused_at_hit = 0

    def admit(self) -> Admission:
        """Count a new connection; what it may do."""
        self.open += 1
        bound = self.limits.max_connections
        if bound <= 0 or self.open <= bound:
            return Admission.SERVED
        if not self._saturated:
            self._saturated = True
            self._refused_at_hit = self.refused
            log.warning(
                "http_connections_bound_hit",
                extra={"fields": {"max_connections": bound, "open": self.open}},
            )
        if self.open > bound + CONNECTION_RESERVE:
            self.refused += 1
            return Admission.CLOSED
        return Admission.LIVENESS_ONLY

    def note_refused(self) -> None:
        """A request on a connection past the bound was answered 503."""
        self.refused += 1

    def release(self) -> None:
        """A counted connection closed."""
        self.open -= 1
        bound = self.limits.max_connections
        if self._saturated and self.open <= bound * BOUND_CLEARS_AT:
            self._saturated = False
            log.info(
                "http_connections_bound_cleared",
                extra={
                    "fields": {
                        "max_connections": bound,
                        "open": self.open,
                        "refused": self.refused - self._refused_at_hit,
                    }
                },
            )


class PausedClock(FlowControl):
    """uvicorn's flow control, also counting the seconds reading was paused by the server."""

    def __init__(
        self, transport: asyncio.Transport, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(transport)
        self.clock = clock
        self._paused_at: float | None = None
        self._paused_seconds = 0.0

    def pause_reading(self) -> None:
        if not self.read_paused:
            self._paused_at = self.clock()
        super().pause_reading()

    def resume_reading(self) -> None:
        if self._paused_at is not None:
            self._paused_seconds += self.clock() - self._paused_at
            self._paused_at = None
        super().resume_reading()

    def reading_time(self) -> float:
        """A clock that stands still while reading is paused."""
        now = self.clock()
        paused = self._paused_seconds
        if self._paused_at is not None:
            paused += now - self._paused_at
        return now - paused


class BodyPace:
    """A body's bytes per window of reading time: each window must bring ``min_rate * window``."""

    def __init__(self, min_rate: int, window: float, reading_time: float) -> None:
        self.needed = min_rate * window
        self.window = window
        self.started = reading_time
        self.received = 0

    def restart(self, reading_time: float) -> None:
        self.started = reading_time
        self.received = 0

    def check(self, reading_time: float) -> float | None:
        """Seconds of reading time until the next check; None when a whole window brought
        too few bytes."""
        elapsed = reading_time - self.started
        if elapsed < self.window:
            return self.window - elapsed
        if self.received < self.needed:
            return None
        self.restart(reading_time)
        return self.window


class BoundedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with bounds on heads, bodies and connections.

    Use ``bounded_protocol(limits)``: it gives a subclass bound to one ``ConnectionGate``.
    """

    gate: ClassVar[ConnectionGate]

    _head_bytes = 0  # parsed bytes of the current request's line and headers
    _pending_bytes = 0  # bytes received since the current head began, not yet all parsed
    _in_head = True  # what arrives now belongs to a request's head (or precedes one)
    _head_began = False  # a byte of the current head arrived
    _refused = False  # answered here: whatever the client still sends is dropped
    _admission: Admission | None = None  # set once counted by the gate
    _head_timer: asyncio.TimerHandle | None = None  # while a head is awaited
    _body_timer: asyncio.TimerHandle | None = None  # while a body is received
    _pace: BodyPace | None = None

    # -- connection ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.flow = PausedClock(transport)
        self._admission = self.gate.admit()
        if self._admission is Admission.CLOSED:
            self._refused = True
            transport.close()
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        self._stop_body_pace()
        if self._admission is not None:
            self._admission = None
            self.gate.release()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_head:
            self._head_began = True
            self._arm_head_timer()  # the first bytes after a request: its successor's head
            self._pending_bytes += len(data)
            if self._pending_bytes > HEAD_MAX_BYTES + READ_MAX_BYTES:
                self._refuse_head_size(431, "the request's headers are too large")
                return
        super().data_received(data)

    # -- parser callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._head_bytes = 0
        self._pending_bytes = 0
        self._in_head = True
        self._head_began = True
        self._arm_head_timer()  # a pipelined head, begun in the read that ended a body
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._head_bytes += len(url)
        if self._head_bytes > HEAD_MAX_BYTES:
            self._refuse_head_size(414, "the request's URL is too long")
            return
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4  # ": " and CRLF
        if self._head_bytes > HEAD_MAX_BYTES:
            self._refuse_head_size(431, "the request's headers are too large")
            return
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_began = False
        self._disarm_head_timer()
        if self._refused:
            return
        if self._admission is Admission.LIVENESS_ONLY:
            if self.url.split(b"?", 1)[0] != LIVENESS_PATH.encode():
                self.gate.note_refused()
                self._refuse(
                    503,
                    f"more than {self.gate.limits.max_connections} connections are open "
                    f"(max_connections); only {LIVENESS_PATH} is answered on this one",
                    [(b"retry-after", str(RETRY_AFTER_SECONDS).encode())],
                )
                return
            super().on_headers_complete()
            if self.cycle is not None:
                self.cycle.keep_alive = False  # one answer, then the place is given back
        else:
            super().on_headers_complete()
        self._start_body_pace()

    def on_body(self, body: bytes) -> None:
        if self._refused:
            return
        if self._pace is not None:
            self._pace.received += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._stop_body_pace()
        self._in_head = True  # what follows is the next request's
        self._head_began = False
        self._pending_bytes = 0
        if not self._refused:
            super().on_message_complete()

    # -- head time ---------------------------------------------------------------------------

    def _arm_head_timer(self) -> None:
        seconds = self.gate.limits.head_seconds
        over_bound = self._admission is Admission.LIVENESS_ONLY
        if over_bound and not 0 < seconds <= OVER_BOUND_HEAD_SECONDS:
            seconds = OVER_BOUND_HEAD_SECONDS
        if self._head_timer is None and seconds > 0 and not self._refused:
            self._head_timer = self.loop.call_later(seconds, self._head_timed_out, seconds)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self, seconds: float) -> None:
        self._head_timer = None
        if self._refused or self.transport.is_closing():
            return
        began = self._head_began
        in_flight = self.cycle is not None and not self.cycle.response_complete
        log.info(
            "http_head_timeout",
            extra={
                "fields": {
                    "client": _client(self.client),
                    "seconds": seconds,
                    "bytes": self._pending_bytes,
                    "answer": "after_response" if in_flight else 408 if began else "close",
                }
            },
        )
        if began and not in_flight:
            self._refuse(408, f"the request's head did not arrive within {seconds:g} s")
            return
        self._refused = True
        if in_flight:
            # A pipelined head stalls behind a response still being sent: no 408 in the
            # middle of it; the connection closes once that response is sent.
            self.cycle.keep_alive = False
        else:
            self.transport.close()

    # -- body pace ---------------------------------------------------------------------------

    def _start_body_pace(self) -> None:
        limits = self.gate.limits
        if limits.body_min_rate <= 0 or limits.body_window_seconds <= 0:
            return
        self._pace = BodyPace(
            limits.body_min_rate, limits.body_window_seconds, self._reading_time()
        )
        self._body_timer = self.loop.call_later(limits.body_window_seconds, self._check_pace)

    def _stop_body_pace(self) -> None:
        self._pace = None
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _reading_time(self) -> float:
        return self.flow.reading_time() if isinstance(self.flow, PausedClock) else time.monotonic()

    def _check_pace(self) -> None:
        self._body_timer = None
        pace = self._pace
        if pace is None or self._refused or self.transport.is_closing():
            return
        now = self._reading_time()
        if self.cycle is not None and self.cycle.waiting_for_100_continue:
            pace.restart(now)  # the client waits for "100 Continue", sent when the app reads
            wait: float | None = pace.window
        else:
            wait = pace.check(now)
        if wait is not None:
            self._body_timer = self.loop.call_later(wait, self._check_pace)
            return
        # Answered already, or queued behind a pipelined response still being sent: no 408.
        answered = bool(self.pipeline) or (self.cycle is not None and self.cycle.response_started)
        log.info(
            "http_body_too_slow",
            extra={
                "fields": {
                    "client": _client(self.client),
                    "min_rate": self.gate.limits.body_min_rate,
                    "window_seconds": pace.window,
                    "bytes": pace.received,
                    "answer": "close" if answered else 408,
                }
            },
        )
        self._pace = None
        if self.cycle is not None and not self.cycle.response_complete:
            # The application sees the client gone; anything it still sends is dropped.
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        if answered:
            self._refused = True
            self.transport.close()
            return
        self._refuse(
            408,
            f"the request's body arrived slower than {self.gate.limits.body_min_rate} bytes/s "
            f"over {pace.window:g} s (request_body_min_rate)",
        )

    # -- refusals ------------------------------------------------------------------------------

    def _refuse_head_size(self, status: int, detail: str) -> None:
        if self._refused:
            return
        log.info(
            "http_head_refused",
            extra={
                "fields": {
                    "status": status,
                    "client": _client(self.client),
                    "limit": HEAD_MAX_BYTES,
                }
            },
        )
        self._refuse(
            status, f"{detail} (at most {HEAD_MAX_BYTES} bytes of request line and headers)"
        )

    def _refuse(
        self, status: int, detail: str, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        """Answer ``status`` as problem details and close; the rest of the request is ignored."""
        if self._refused:
            return
        self._refused = True
        self._disarm_head_timer()
        self._stop_body_pace()
        body = json.dumps(
            {
                "type": "about:blank",
                "title": STATUS_LINE[status].decode().split(" ", 2)[2].strip(),
                "status": status,
                "detail": detail,
            }
        ).encode()
        head = [STATUS_LINE[status]]
        for name, value in [*self.server_state.default_headers, *headers]:
            head.extend([name, b": ", value, b"\r\n"])
        head.extend(
            [
                b"content-type: application/problem+json\r\n",
                b"content-length: " + str(len(body)).encode() + b"\r\n",
                b"connection: close\r\n\r\n",
            ]
        )
        self.transport.write(b"".join(head) + body)
        # Half-close and keep discarding what the client still sends for a moment: closing
        # with unread bytes would reset the connection and could lose the answer.
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.flow.resume_reading()
        self.loop.call_later(LINGER_SECONDS, self.transport.close)


def bounded_protocol(limits: HttpLimits) -> type[BoundedHttpProtocol]:
    """The protocol class to give uvicorn (``http=``): its connections share one gate."""
    gate = ConnectionGate(limits)
    return type("BoundedHttpProtocol", (BoundedHttpProtocol,), {"gate": gate})


def _client(address: tuple[str, int] | None) -> str | None:
    return None if address is None else f"{address[0]}:{address[1]}"
