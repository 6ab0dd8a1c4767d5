"""gunicorn's threaded worker, with a pool thread that waits a moment on its
kept-alive connection for the client's next request.

gunicorn's ``gthread`` worker hands a kept-alive connection back to its main
thread after every reply (a byte through a pipe wakes that thread, which
watches the socket with epoll), and the next request back to a pool thread:
two hand-offs between threads, each a wake-up and a turn at the GIL, between
a client's requests on one connection. A client that calls again soon (a
gateway in front of us, an SDK in a loop, a benchmark) waits for both.

So a thread that has answered on a kept-alive connection waits on it for the
next request itself, for up to :attr:`HeldKeepAliveWorker.hold_seconds`, and
serves it without a hand-off. At most half the pool waits like this at once,
so idle connections never take the threads that requests need; after the
wait, and when half the pool is already waiting, the connection goes back to
the main thread exactly as gunicorn does. gunicorn_conf.py selects it.
"""

from __future__ import annotations

import threading

from gunicorn.workers.gthread import ThreadWorker


class HeldKeepAliveWorker(ThreadWorker):
    #: how long a pool thread waits on its connection for the next request
    hold_seconds = 0.25

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._holding = 0
        self._holding_lock = threading.Lock()
        self._most_holding = max(1, self.cfg.threads // 2)  # half the pool: the rest serves requests

    def handle(self, conn):
        while True:
            keep = super().handle(conn)
            if keep is not True or not self._next_request_came(conn):
                return keep

    def _next_request_came(self, conn) -> bool:
        """Whether ``conn``'s next request (or its close) arrived within
        :attr:`hold_seconds`, while at most half the pool waits."""
        if not self.alive:
            return False
        if conn.parser.unreader.buf.getvalue():  # already read along with the last request
            return True
        with self._holding_lock:
            if self._holding >= self._most_holding:
                return False
            self._holding += 1
        try:
            conn.data_ready = False
            return conn.wait_for_data(self.hold_seconds) and self.alive
        finally:
            with self._holding_lock:
                self._holding -= 1
