"""Slow clients cannot starve the production topology: nginx (deploy/
nginx.conf.template) in front of gunicorn reads requests itself, so 40
connections trickling their headers a byte a second tie up no app thread."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests

from ..conftest import DEFAULT_PASSWORD, free_port, need, port_open

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "deploy" / "nginx.conf.template"

pytestmark = [pytest.mark.model, pytest.mark.slow]


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)


@pytest.fixture
def nginx(tmp_path):
    """Start nginx from the repository's template in front of ``upstream``."""
    exe = nginx_binary()
    need(exe is not None, "nginx is not installed (apt-get install nginx-light; .ci/run does)")
    procs = []

    def start(upstream: str) -> str:
        port = free_port()
        conf = tmp_path / "nginx.conf"
        conf.write_text(TEMPLATE.read_text().replace("${LISTEN}", f"127.0.0.1:{port}")
                        .replace("${UPSTREAM}", upstream).replace("${PREFIX}", str(tmp_path)))
        p = subprocess.Popen([exe, "-c", str(conf), "-p", str(tmp_path), "-g", "daemon off;"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(p)
        deadline = time.monotonic() + 10
        while not port_open("127.0.0.1", port):
            assert p.poll() is None, p.stderr.read().decode()
            assert time.monotonic() < deadline, "nginx did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{port}"

    yield start
    for p in procs:
        p.terminate()
        p.wait(10)


def trickle(port: int, stop: threading.Event, opened: list) -> None:
    """A client that sends a request's headers one byte a second, for as long as allowed."""
    request = b"POST /call_model HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
    except OSError:
        return
    opened.append(s)
    for byte in request:
        if stop.wait(1.0):
            break
        try:
            s.send(bytes([byte]))
        except OSError:
            break  # nginx dropped it: too slow
    s.close()


def test_forty_slow_clients_leave_health_fast_and_calls_working(live_server, make_user, nginx):
    make_user("alice", quota=10)
    with live_server(threads=4, TRUSTED_PROXIES="1") as srv:
        url = nginx(f"127.0.0.1:{srv.port}")
        port = int(url.rsplit(":", 1)[1])
        stop, opened = threading.Event(), []
        slow = [threading.Thread(target=trickle, args=(port, stop, opened), daemon=True) for _ in range(40)]
        for t in slow:
            t.start()
        try:
            time.sleep(2.0)  # every slow client is connected and trickling
            assert len(opened) == 40
            t0 = time.monotonic()
            health = requests.get(url + "/health_check", timeout=5)
            health_seconds = time.monotonic() - t0
            call = requests.post(url + "/call_model", json={"prompt": "Hi", "max_tokens": 2},
                                 auth=("alice", DEFAULT_PASSWORD), timeout=60)
        finally:
            stop.set()
            for t in slow:
                t.join(5)
        assert health.status_code == 204 and health_seconds < 1.0, health_seconds
        assert call.status_code == 201 and call.json()["response"] is not None
