"""A real HTTP webhook receiver for the tests: a threaded HTTP server on a local
port that verifies each delivery's signature and can be told to fail the
first ones (a 500, a hang longer than the sender's timeout, a closed port)."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from model_api.services.webhooks import verify

from .conftest import free_port


@dataclass
class Delivery:
    at: float  # time.monotonic() when it arrived
    headers: dict[str, str]
    body: bytes
    answered: str  # "500", "hang", "200"
    signed: bool | None = None

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.body)


@dataclass
class Receiver:
    """``script``: how to answer the first requests, in order (then 200):

    * ``"500"``: answer 500;
    * ``"hang"``: answer nothing for ``hang_seconds`` (the sender times out);
    * ``"hang+down"``: as ``hang``, and close the port for ``down_seconds`` (the
      next attempts find it refused).
    """

    script: list[str] = field(default_factory=list)
    secret: str | None = None
    hang_seconds: float = 3.0
    down_seconds: float = 3.0
    port: int = field(default_factory=free_port)
    deliveries: list[Delivery] = field(default_factory=list)
    refused_windows: list[tuple[float, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    n = len(receiver.deliveries)
                    action = receiver.script[n] if n < len(receiver.script) else "200"
                    d = Delivery(time.monotonic(), dict(self.headers), body, action.split("+")[0])
                    if receiver.secret is not None:
                        d.signed = verify(receiver.secret, d.headers, body)
                    receiver.deliveries.append(d)
                if action.endswith("+down"):
                    receiver._go_down()
                if action.startswith("hang"):
                    time.sleep(receiver.hang_seconds)
                    return  # the sender gave up long ago
                self.send_response(500 if action == "500" else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._handler = Handler
        self._listen()
        return self

    def _listen(self) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def _go_down(self) -> None:
        """Close the port now, open it again after ``down_seconds`` (from another thread)."""
        start = time.monotonic()
        server = self._server

        def bounce() -> None:
            assert server is not None
            server.shutdown()
            server.server_close()
            time.sleep(max(0.0, self.down_seconds - (time.monotonic() - start)))
            self.refused_windows.append((start, time.monotonic()))
            self._listen()

        threading.Thread(target=bounce, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def acknowledged(self) -> list[Delivery]:
        return [d for d in self.deliveries if d.answered == "200"]

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
