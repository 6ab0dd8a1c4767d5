"""A TCP proxy on 127.0.0.1 that a test can switch between passing traffic,
freezing it (connections accepted, nothing forwarded: a database that stops
answering) and refusing it (listener closed, open connections reset: a
database that is down)."""

from __future__ import annotations

import select
import socket
import threading


class TcpProxy:
    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.port = 0
        self._mode = "pass"
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()

    # -- the switch ---------------------------------------------------------------
    def start(self) -> TcpProxy:
        self._listen()
        return self

    def freeze(self) -> None:
        """Accept, but forward nothing either way (open connections hang too)."""
        self._mode = "freeze"

    def refuse(self) -> None:
        """Close the listener (new connections are refused) and reset open ones."""
        self._mode = "refuse"
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); a bare close() would not
            except OSError:
                pass
            listener.close()
        for c in conns:
            _reset(c)

    def restore(self) -> None:
        """Pass traffic again (on the same port)."""
        if self._mode == "freeze":
            # frozen connections are in an unknown state: drop them
            with self._lock:
                conns, self._conns = self._conns, []
            for c in conns:
                _reset(c)
        self._mode = "pass"
        if self._listener is None:
            self._listen()

    def close(self) -> None:
        self._stop.set()
        self.refuse()

    # -- plumbing -----------------------------------------------------------------
    def _listen(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(128)
        self.port = s.getsockname()[1]
        with self._lock:
            self._listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by refuse()
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select(list(peers), [], [], 0.2)
                if self._mode != "pass":
                    if self._mode == "refuse":
                        return
                    continue  # frozen: leave the bytes unread
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    peers[s].sendall(data)
        except (OSError, ValueError):
            pass
        finally:
            for s in (a, b):
                _reset(s)


def _reset(s: socket.socket) -> None:
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
    except OSError:
        pass
