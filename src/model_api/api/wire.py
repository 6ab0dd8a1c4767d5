"""How replies leave the socket: in as few TCP segments as what is ready allows.

gunicorn writes a reply's headers, then each piece of its body, with a send call
each (and a stream's last, empty chunk with another). A client on the same host
(nginx in front of us, a benchmark) is woken by every segment, and on two cores
the next write then waits for it: 0.5 ms a whole reply between its headers and
its body (tcpdump on loopback, bench/RESULTS.md). So the socket is corked
(Linux's TCP_CORK: the kernel holds what is written until uncorked) from the
end of the view until the reply is written:

* a whole reply goes out as one segment when gunicorn has written it;
* a streamed one is flushed whenever gunicorn asks for its next piece, before
  that piece is waited for, so no event ever waits for a later one: its headers
  travel with its first events, and its last events with the closing chunk.

Elsewhere (no TCP_CORK, a Unix socket, the test client) replies go as written.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Iterator
from typing import Any

from flask import Flask, Response, request

_TCP_CORK = getattr(socket, "TCP_CORK", None)
_TCP_FAMILIES = (socket.AF_INET, socket.AF_INET6)


def init_app(app: Flask) -> None:
    app.after_request(_cork)


def _cork(resp: Response) -> Response:
    sock = request.environ.get("gunicorn.socket")
    if sock is None or _TCP_CORK is None or sock.family not in _TCP_FAMILIES or not _set_cork(sock, True):
        return resp
    if resp.is_streamed:
        resp.response = _FlushedBeforeEachPiece(resp.response, sock)
    # runs before the access line's callback (api/observability.py), which is registered earlier
    # but whose after_request hook runs later: after_request hooks run last-registered first
    resp.call_on_close(lambda: _set_cork(sock, False))
    return resp


def _set_cork(sock: socket.socket, on: bool) -> bool:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_CORK, int(on))
        return True
    except OSError:  # the client is gone
        return False


class Last(str):
    """A streamed body's last piece (api/streaming.py yields its final events as
    one): nothing waits after it, so the socket stays corked and the closing
    chunk leaves in the same segment, flushed when the reply is closed."""


class _FlushedBeforeEachPiece:
    """A streamed body that flushes what was written before it makes its next
    piece, and corks again before handing that piece over. Keeps the body's
    ``close()`` (a stream's close cancels its call: api/streaming.py)."""

    def __init__(self, body: Iterable[Any], sock: socket.socket):
        self._body = body
        self._sock = sock

    def __iter__(self) -> Iterator[Any]:
        for piece in self._body:
            _set_cork(self._sock, True)
            yield piece
            if not isinstance(piece, Last):
                _set_cork(self._sock, False)  # out goes what was written, before the wait for more

    def close(self) -> None:
        close = getattr(self._body, "close", None)
        if close is not None:
            close()
