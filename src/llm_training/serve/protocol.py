"""uvicorn's settings for a server facing the open network: its HTTP/1.1 protocol (h11) with a deadline
for a request's line and headers, and the keep-alive timeout.

uvicorn closes an idle connection after ``timeout_keep_alive``, but a client that sends a byte now and then
(slowloris) keeps a connection, and its slot, forever: the app only sees a request once its headers are
complete, so the deadline for them lives here. The body's deadline is the app's (``Guard``)."""

from __future__ import annotations

import functools

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class TimedH11Protocol(H11Protocol):
    """h11 with ``header_timeout``: a connection whose request line and headers are not complete that long
    after it opened, or after the first byte of a following request, is closed."""

    def __init__(self, *args, header_timeout: float = 10.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.header_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._watch_headers()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_headers()

    def connection_lost(self, exc) -> None:
        self._stop_timer()
        super().connection_lost(exc)

    def _watch_headers(self) -> None:
        # their_state is IDLE until a request's headers are complete (and again between requests, where
        # uvicorn's keep-alive timer closes an idle connection: the deadline starts with the next byte)
        reading = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if reading and self.header_timer is None:
            self.header_timer = self.loop.call_later(self.header_timeout, self._too_slow)
        elif not reading:
            self._stop_timer()

    def _stop_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _too_slow(self) -> None:
        self.header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()  # no response: h11 cannot answer a request it has not read


def uvicorn_config(app, options, **settings):
    """A ``uvicorn.Config`` for ``app`` (an app, or an import string with ``factory=True``) with the
    timeouts of ``options`` (a ``ServeOptions``)."""
    import uvicorn

    protocol = functools.partial(TimedH11Protocol, header_timeout=options.header_timeout)
    return uvicorn.Config(app, http=protocol, timeout_keep_alive=options.keep_alive_timeout, log_level="warning",
                          **settings)  # fmt: skip
