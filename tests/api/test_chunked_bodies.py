"""Bodies sent with ``Transfer-Encoding: chunked`` (no Content-Length) over real HTTP
to a real gunicorn: over MAX_BODY_BYTES is a 413, like a body that announces its size."""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlparse

MIB = 1024 * 1024


def post_chunked(url: str, path: str, body: bytes, headers: dict[str, str], chunk: int = 64 * 1024):
    """POST ``body`` in chunks without a Content-Length; (status, parsed JSON reply)."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    try:
        conn.putrequest("POST", path)
        for name, value in {"Content-Type": "application/json", "Transfer-Encoding": "chunked", **headers}.items():
            conn.putheader(name, value)
        conn.endheaders()
        try:
            for i in range(0, len(body), chunk):
                piece = body[i:i + chunk]
                conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            conn.send(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer (and stop reading) before the last chunk
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"null")
    finally:
        conn.close()


def _prompt_body(size: int) -> bytes:
    """A valid JSON body of exactly ``size`` bytes."""
    head, tail = b'{"prompt": "', b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


def test_chunked_bodies_are_limited_like_sized_ones(live_server, make_user):
    headers = make_user("alice", quota=0)  # quota 0: a body that is read and valid ends in a cheap 429
    with live_server(MAX_PROMPT_CHARS=str(2 * MIB)) as srv:
        for path in ("/call_model", "/v1/completions"):
            # one byte over the limit: refused as too large, not cut and called invalid JSON
            status, reply = post_chunked(srv.url, path, _prompt_body(MIB + 1), headers)
            assert status == 413, reply
            assert reply["error"]["code"] == "payload_too_large"

            # exactly at the limit: read whole, as if it had come with its length (then refused
            # for what it asks: no quota left -- insufficient_quota in /v1's dialect -- or a
            # prompt longer than the model's context)
            status, reply = post_chunked(srv.url, path, _prompt_body(MIB), headers)
            assert reply["error"]["code"] in ("quota_exceeded", "insufficient_quota", "prompt_too_long",
                                              "context_length_exceeded"), reply

        # a small chunked body is read and validated as usual
        status, reply = post_chunked(srv.url, "/call_model", b'{"prompt": "Hi", "temperature": "hot"}', headers,
                                     chunk=7)
        assert status == 400 and "temperature" in reply["error"]["message"], reply
