"""A scripted OpenAI-compatible upstream: a real HTTP server on a local port that
answers with what a test says (the answers a real model server is hard to
provoke into). Used by the remote engine's tests and the API's."""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Asked:
    """A request the upstream received."""

    path: str
    headers: dict[str, str]
    body: bytes
    client_port: int

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Reply:
    """The upstream's answer: a JSON object or bytes (sent with a Content-Length),
    or an iterable of byte pieces (sent chunked, each as soon as it is made;
    :data:`HANG_UP` among them closes the connection there)."""

    status: int = 200
    body: Any = b""
    headers: dict[str, str] = field(default_factory=dict)


#: a piece of a chunked Reply body: the upstream closes the connection there, mid-body
HANG_UP = None


@contextmanager
def upstream(answer: Callable[[Asked], Reply], tls: tuple[str, str] | None = None) -> Iterator[str]:
    """A real HTTP/1.1 server answering with ``answer``; yields its ``/v1`` base URL.
    ``tls``: (certificate file, key file) to serve https instead."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, chunked streams: as model servers do

        def do_GET(self) -> None:
            self._serve()

        do_POST = do_GET

        def log_message(self, *args: Any) -> None:
            pass

        def _serve(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            reply = answer(Asked(self.path, {k.lower(): v for k, v in self.headers.items()}, body,
                                 self.client_address[1]))
            self.send_response(reply.status)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            if isinstance(reply.body, bytes | dict):
                data = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                for piece in reply.body:
                    if piece is HANG_UP:
                        self.close_connection = True
                        return
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.write(b"0\r\n\r\n")
            except OSError:  # the client hung up
                self.close_connection = True

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def sse_data(*objs) -> bytes:
    """Server-Sent Events carrying each object as JSON (bytes as they are: ``b"[DONE]"``)."""
    return b"".join(b"data: " + (o if isinstance(o, bytes) else json.dumps(o).encode()) + b"\n\n" for o in objs)


def event_stream(*objs) -> Reply:
    """An answer streaming one event per object, each as its own chunk."""
    return Reply(headers={"Content-Type": "text/event-stream"}, body=[sse_data(o) for o in objs])
