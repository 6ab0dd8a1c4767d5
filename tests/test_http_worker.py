"""The gunicorn worker (model_api/http_worker.py) serves a kept-alive
connection's next request in the thread that answered the last one, and never
lets idle connections take the threads that requests need.

A real gunicorn process with the worker and a tiny WSGI app (this module's
``app``: it names the thread that served it), over real sockets."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from model_api.http_worker import HeldKeepAliveWorker

from .conftest import free_port, port_open

ROOT = Path(__file__).resolve().parents[1]
THREADS = 4


class LongHold(HeldKeepAliveWorker):
    """Holds long enough that a request stuck behind a hold is plain to see."""

    hold_seconds = 3.0


class ShortHold(HeldKeepAliveWorker):
    hold_seconds = 0.2


def app(environ, start_response):
    body = str(threading.get_ident()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


@contextmanager
def server(worker: str = f"{__name__}.LongHold"):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--worker-class", worker, "--threads", str(THREADS),
         "--keep-alive", "30", "--graceful-timeout", "20", "-b", f"127.0.0.1:{port}", f"{__name__}:app"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not port_open("127.0.0.1", port):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "gunicorn did not start"
            time.sleep(0.05)
        yield port, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


class Connection:
    """One kept-alive HTTP/1.1 connection, read reply by reply."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def send(self, n: int = 1) -> None:
        self.sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * n)

    def reply(self) -> str:
        """The next reply's body (the serving thread's id)."""
        while b"\r\n\r\n" not in self.buf:
            self._read()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200"), head
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        while len(self.buf) < length:
            self._read()
        body, self.buf = self.buf[:length], self.buf[length:]
        return body.decode()

    def call(self) -> str:
        self.send()
        return self.reply()

    def _read(self) -> None:
        data = self.sock.recv(65536)
        assert data, "the server closed the connection"
        self.buf += data

    def close(self) -> None:
        self.sock.close()


def timed(fn):
    t0 = time.monotonic()
    out = fn()
    return out, time.monotonic() - t0


pytestmark = pytest.mark.slow


def test_each_kept_alive_connection_is_served_by_the_thread_that_waits_on_it():
    with server() as (port, _):
        conns = [Connection(port) for _ in range(2)]
        served = [[c.call() for c in conns] for _ in range(3)]  # A, B, A, B, A, B
        for c in conns:
            c.close()
    by_conn = list(zip(*served))
    assert all(len(set(threads)) == 1 for threads in by_conn), by_conn
    assert by_conn[0][0] != by_conn[1][0]


def test_idle_connections_never_hold_more_than_half_the_threads():
    with server() as (port, _):
        idle = [Connection(port) for _ in range(THREADS)]
        for c in idle:
            c.call()  # each then waits for a next request that does not come
        newcomer = Connection(port)
        _, seconds = timed(newcomer.call)
        for c in idle + [newcomer]:
            c.close()
    assert seconds < LongHold.hold_seconds / 2, f"a new request waited {seconds:.2f} s for a thread"


def test_pipelined_requests_are_answered_without_waiting_for_more():
    with server() as (port, _):
        c = Connection(port)
        c.send(2)  # the second arrives with the first, already read when the first is answered
        _, seconds = timed(lambda: (c.reply(), c.reply()))
        c.close()
    assert seconds < LongHold.hold_seconds / 2


def test_a_connection_idle_past_the_hold_is_still_served():
    with server(f"{__name__}.ShortHold") as (port, _):
        c = Connection(port)
        c.call()
        time.sleep(0.5)  # back to gunicorn's own keep-alive poller
        assert c.call()
        c.close()


def test_a_client_gone_during_the_hold_leaves_the_server_serving():
    with server() as (port, _):
        gone = Connection(port)
        gone.call()
        gone.close()  # while its thread waits on it
        assert Connection(port).call()


def test_sigterm_stops_the_worker_while_threads_hold_connections():
    with server() as (port, proc):
        held = [Connection(port) for _ in range(2)]
        for c in held:
            c.call()
        proc.terminate()
        _, seconds = timed(lambda: proc.wait(15))
        for c in held:
            c.close()
    assert proc.returncode == 0
    assert seconds < 10
