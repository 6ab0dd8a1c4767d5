"""How replies leave a real gunicorn server (api/wire.py), counted in TCP
segments on a real socket (Linux's TCP_INFO): a whole reply's headers and body
in one segment, a stream's events as soon as they are made, those made
together in one."""

from __future__ import annotations

import json
import socket
import struct
import sys

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="TCP_CORK and TCP_INFO's segment counts are Linux's")

#: struct tcp_info's tcpi_data_segs_in (segments that carried data), a __u32 at this offset since Linux 4.6
_DATA_SEGS_IN = 152


def data_segments_in(sock: socket.socket) -> int:
    return struct.unpack_from("I", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256), _DATA_SEGS_IN)[0]


def exchange(sock: socket.socket, request: bytes) -> tuple[bytes, int]:
    """Send one request, read its whole reply (Content-Length or chunked); (reply, data segments it came in)."""
    before = data_segments_in(sock)
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        data += received(sock)
    head, body = data.split(b"\r\n\r\n", 1)
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), None)
    while (len(body) < length) if length is not None else not body.endswith(b"0\r\n\r\n"):
        body += received(sock)
    return head + b"\r\n\r\n" + body, data_segments_in(sock) - before


def received(sock: socket.socket) -> bytes:
    data = sock.recv(65536)
    assert data, "the server closed the connection before the reply was whole"
    return data


def post(path: str, body: dict, headers: str = "") -> bytes:
    raw = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n{headers}"
            f"Content-Length: {len(raw)}\r\n\r\n").encode() + raw


def test_a_whole_reply_leaves_in_one_segment_and_a_stream_in_many(live_server, make_user):
    with live_server(threads=4) as srv:
        auth = "".join(f"{k}: {v}\r\n" for k, v in make_user("alice").items())
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
            for _ in range(3):  # a kept-alive connection: each reply on it, not only the first
                reply, segments = exchange(sock, b"GET /ready HTTP/1.1\r\nHost: test\r\n\r\n")
                assert reply.startswith(b"HTTP/1.1 200") and segments == 1
            request = {"model": "x", "messages": [{"role": "user", "content": "Count to ten"}],
                       "max_tokens": 8, "temperature": 0}
            reply, segments = exchange(sock, post("/v1/chat/completions", request, auth))
            assert reply.startswith(b"HTTP/1.1 200") and b'"chat.completion"' in reply and segments == 1
            # one token: the headers with the role and the token, then the final event with [DONE]
            reply, segments = exchange(sock, post("/v1/chat/completions", {**request, "stream": True,
                                                                           "max_tokens": 1}, auth))
            assert reply.count(b"data: ") == 4 and reply.rstrip().endswith(b"0") and segments == 2
            # more tokens: each leaves as it is made, not held back for the next
            reply, segments = exchange(sock, post("/v1/chat/completions", {**request, "stream": True}, auth))
            assert reply.count(b"data: ") >= 6 and segments >= reply.count(b"data: ") - 3
