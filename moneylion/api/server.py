"""The HTTP server's own bounds: a request's line and headers are at most HEAD_MAX_BYTES.

uvicorn's httptools protocol buffers a request's head without a limit (a 1 MB header was
answered 200). ``BoundedHttpProtocol`` counts the head as it is parsed and answers ``431 Request
Header Fields Too Large`` (``414 URI Too Long`` for the request line alone) past the limit,
then closes the connection; the application never sees such a request. Bytes that arrive while
a head is incomplete are counted too, so a single endless header is cut off after at most one
read beyond the limit, never buffered whole.
"""

from __future__ import annotations

import json
import logging

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

log = logging.getLogger(__name__)

HEAD_MAX_BYTES = 64 * 1024  # request line and headers together
READ_MAX_BYTES = 256 * 1024  # asyncio's largest read: what one data_received may hold
LINGER_SECONDS = 1.0  # after a refusal, how long the rest of the request is read and dropped


class BoundedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bound on each request's line and headers."""

    _head_bytes = 0  # parsed bytes of the current request's line and headers
    _pending_bytes = 0  # bytes received since the current head began, not yet all parsed
    _in_head = True
    _refused = False

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_head:
            self._pending_bytes += len(data)
            if self._pending_bytes > HEAD_MAX_BYTES + READ_MAX_BYTES:
                self._refuse(431, "the request's headers are too large")
                return
        super().data_received(data)

    def on_message_begin(self) -> None:
        self._head_bytes = 0
        self._pending_bytes = 0
        self._in_head = True
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._head_bytes += len(url)
        if self._head_bytes > HEAD_MAX_BYTES:
            self._refuse(414, "the request's URL is too long")
            return
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4  # ": " and CRLF
        if self._head_bytes > HEAD_MAX_BYTES:
            self._refuse(431, "the request's headers are too large")
            return
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        if not self._refused:
            super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._refused:
            super().on_message_complete()

    def _refuse(self, status: int, detail: str) -> None:
        """Answer ``status`` as problem details and close; the rest of the request is ignored."""
        if self._refused:
            return
        self._refused = True
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
        body = json.dumps(
            {
                "type": "about:blank",
                "title": STATUS_LINE[status].decode().split(" ", 2)[2].strip(),
                "status": status,
                "detail": f"{detail} (at most {HEAD_MAX_BYTES} bytes of request line and headers)",
            }
        ).encode()
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
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
        self.loop.call_later(LINGER_SECONDS, self.transport.close)


def _client(address: tuple[str, int] | None) -> str | None:
    return None if address is None else f"{address[0]}:{address[1]}"
