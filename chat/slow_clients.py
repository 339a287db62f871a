"""A deadline for a request's headers, against clients that send them a byte at a time.

Uvicorn (0.55) closes a keep-alive connection idle after a response, but once any byte has
arrived it waits for the rest of the headers for ever: a few hundred sockets dribbling one
byte every few seconds (slowloris) hold every connection the server can take. This wraps
uvicorn's HTTP protocol class: from the moment a connection opens, or the first byte of a
next request arrives, the headers must be complete within `header_timeout` seconds, or the
connection is closed. Bodies and streamed responses are not affected.

Only public protocol hooks are used (connection_made, data_received, connection_lost, and the
`cycle` attribute uvicorn sets when a request's headers are complete); if a uvicorn release
drops `cycle`, the deadline still bounds how long a connection may take to send its first
request's headers, which is the attack.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol


class _HeaderDeadline:
    """Mixin for a uvicorn HTTP protocol class; `header_timeout` is set by `protocol_class`."""

    header_timeout: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:
        self._deadline: asyncio.TimerHandle | None = None
        self._waiting_for: Any = None
        super().connection_made(transport)  # type: ignore[misc]
        self._arm()

    def data_received(self, data: bytes) -> None:
        cycle = getattr(self, "cycle", None)
        if self._deadline is None and (cycle is None or cycle.response_complete):
            self._arm()  # the first byte of a next request on a kept-alive connection
        super().data_received(data)  # type: ignore[misc]
        if self._deadline is not None and getattr(self, "cycle", None) is not self._waiting_for:
            self._disarm()  # a new request's headers are complete

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def _arm(self) -> None:
        self._waiting_for = getattr(self, "cycle", None)
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self.header_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        transport = getattr(self, "transport", None)
        if transport is not None and not transport.is_closing():
            transport.close()


def protocol_class(header_timeout: float) -> type[asyncio.Protocol]:
    """Uvicorn's default HTTP protocol with a deadline of `header_timeout` s for headers."""
    return type(
        "HeaderDeadlineProtocol",
        (_HeaderDeadline, AutoHTTPProtocol),
        {"header_timeout": header_timeout},
    )
