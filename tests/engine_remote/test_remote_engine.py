"""OpenAIEngine: how upstream answers and failures map to engine errors.

Upstream servers are simulated with httpx.MockTransport (the HTTP boundary, not
our code) for the answers a real server is hard to provoke into; unreachable
and silent upstreams use real sockets. Two real service processes talking to
each other are in tests/live/test_openai_live.py.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
from sqlalchemy import select

from model_api.engine.base import (
    ContextOverflow,
    EngineBusy,
    GenerationRequest,
    SamplingParams,
    UpstreamError,
    UpstreamTimeout,
)
from model_api.engine.remote import OpenAIEngine
from model_api.models import Call, User

from ..conftest import free_port

REQ = GenerationRequest.single_prompt("Hi", SamplingParams(max_tokens=4, temperature=0))


def _sse(*objs) -> bytes:
    return b"".join(b"data: " + (o if isinstance(o, bytes) else json.dumps(o).encode()) + b"\n\n" for o in objs)


def start(engine, request):
    return engine.stream(engine.prepare(request))


def prepared_tokens(engine, request) -> int:
    return engine.prepare(request).n_tokens


def _engine(handler, **kw) -> OpenAIEngine:
    return OpenAIEngine("http://upstream.test/v1", transport=httpx.MockTransport(handler), **kw)


def test_streams_deltas_and_takes_usage_and_model_from_the_upstream():
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "up-model"}]})
        seen.update(json.loads(request.content), auth=request.headers.get("authorization"))
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=_sse(
            {"model": "up-model", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
            {"model": "up-model", "choices": [{"index": 0, "delta": {"content": "Bon"}}]},
            {"model": "up-model", "choices": [{"index": 0, "delta": {"content": "jour"}, "finish_reason": "length"}]},
            {"model": "up-model", "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 2}},
            b"[DONE]"))

    eng = _engine(handler, api_key="sk-up")
    gen = start(eng, REQ)
    assert list(gen) == ["Bon", "jour"]
    r = gen.result
    assert (r.text, r.prompt_tokens, r.completion_tokens, r.finish_reason, r.model) == (
        "Bonjour", 11, 2, "length", "up-model")
    assert seen["model"] == "up-model" and seen["stream"] is True
    assert seen["stream_options"] == {"include_usage": True} and seen["max_tokens"] == 4
    assert seen["messages"] == [{"role": "user", "content": "Hi"}]
    assert seen["auth"] == "Bearer sk-up"


@pytest.mark.parametrize("status,body,headers,error", [
    (400, {"error": {"message": "This model's maximum context length is 2048 tokens", "type": "invalid_request_error",
                     "code": "context_length_exceeded"}}, {}, ContextOverflow),
    (422, {"error": {"code": "prompt_too_long", "message": "prompt is 3000 tokens",
                     "details": {"prompt_tokens": 3000, "context_size": 2048}}}, {}, ContextOverflow),
    (503, {"error": {"message": "busy"}}, {"Retry-After": "7"}, EngineBusy),
    (504, {"error": {"message": "slow"}}, {}, UpstreamTimeout),
    (401, {"error": {"message": "bad key"}}, {}, UpstreamError),
    (500, "<html>oops</html>", {}, UpstreamError),
])
def test_upstream_error_statuses_map_to_engine_errors(status, body, headers, error):
    def handler(request):
        kw = {"json": body} if isinstance(body, dict) else {"content": body.encode()}
        return httpx.Response(status, headers=headers, **kw)

    with pytest.raises(error) as info:
        list(start(_engine(handler, model_name="m"), REQ))
    if status == 422:
        assert (info.value.prompt_tokens, info.value.context_size) == (3000, 2048)
    if status == 503:
        assert info.value.retry_after == 7
    assert not isinstance(info.value, UpstreamTimeout) or status == 504


def test_error_events_and_garbage_mid_stream_are_upstream_errors():
    def handler(request):
        return httpx.Response(200, content=_sse({"choices": [{"delta": {"content": "a"}}]}, b"{not json"))

    gen = start(_engine(handler, model_name="m"), REQ)
    assert next(gen) == "a"
    with pytest.raises(UpstreamError, match="malformed"):
        next(gen)


def test_the_upstream_request_goes_out_when_the_generation_is_made_not_at_its_first_read():
    # so the caller's database work overlaps the upstream's first token (engine/remote.py)
    asked = threading.Event()

    def handler(request):
        asked.set()
        return httpx.Response(200, content=_sse({"choices": [{"delta": {"content": "a"}}]}, b"[DONE]"))

    gen = start(_engine(handler, model_name="m"), REQ)
    assert asked.wait(5), "nothing was sent before the first read"
    assert list(gen) == ["a"] and gen.result.finish_reason == "stop"


def test_closing_mid_stream_stops_reading_the_upstream_and_keeps_what_came():
    sent = []

    def slow_events():
        for i in range(200):
            sent.append(i)
            yield _sse({"choices": [{"delta": {"content": f"t{i} "}}]})
            time.sleep(0.01)
        yield _sse(b"[DONE]")

    gen = start(_engine(lambda r: httpx.Response(200, content=slow_events()), model_name="m"), REQ)
    assert next(gen) == "t0 "
    gen.close()
    assert gen.result is not None and gen.result.finish_reason == "cancelled"
    assert gen.result.text.startswith("t0 ") and len(sent) < 200
    assert list(gen) == []


def _read_request(conn: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, rest = data.split(b"\r\n\r\n", 1)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(rest) < length:
        rest += conn.recv(65536)


def test_a_kept_alive_connection_the_upstream_closed_is_retried_on_a_new_one():
    # a real socket: the first connection answers, then reads the next request and hangs
    # up without answering (what a server closing an idle keep-alive connection looks like)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    body = _sse({"choices": [{"delta": {"content": "ok"}}]}, b"[DONE]")
    answer = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body)) + body
    accepted = []

    def serve():
        for n in range(2):
            conn, _ = srv.accept()
            accepted.append(conn)
            _read_request(conn)
            conn.sendall(answer)
            if n == 0:
                _read_request(conn)  # the second request, on the kept-alive connection
                conn.close()  # ... never answered

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        eng = OpenAIEngine(f"http://127.0.0.1:{srv.getsockname()[1]}/v1", model_name="m", timeout=5)
        assert list(start(eng, REQ)) == ["ok"]
        assert list(start(eng, REQ)) == ["ok"]
        assert len(accepted) == 2
    finally:
        srv.close()
        for c in accepted:
            c.close()


def test_check_is_a_cheap_character_guard():
    eng = _engine(lambda r: httpx.Response(500), model_name="m", context_size=128)
    assert prepared_tokens(eng, GenerationRequest.single_prompt("x" * 400, SamplingParams())) > 0  # may fit: upstream decides
    with pytest.raises(ContextOverflow):
        prepared_tokens(eng, GenerationRequest.single_prompt("x" * 8 * 200, SamplingParams()))


def test_unreachable_upstream_is_502_and_refunded(make_app, make_user, database):
    app = make_app(model_backend="openai", model_base_url=f"http://127.0.0.1:{free_port()}/v1")
    headers = make_user("alice")
    r = app.test_client().post("/call_model", json={"prompt": "Hi", "max_tokens": 2}, headers=headers)
    assert r.status_code == 502 and r.json["error"]["code"] == "upstream_error"
    r = app.test_client().post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                             "stream": True}, headers=headers)
    assert r.status_code == 502 and r.json["error"]["type"] == "server_error"
    with database.session() as s:
        calls = s.scalars(select(Call)).all()
        assert [c.status for c in calls] == ["failed", "failed"] and not any(c.charged for c in calls)
        assert s.scalar(select(User.used)) == 0


def test_silent_upstream_is_504_and_refunded(make_app, make_user, database):
    # accepts connections and never answers
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    conns = []
    stop = threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        app = make_app(model_backend="openai", model_name="m", model_timeout_seconds=0.5,
                       model_base_url=f"http://127.0.0.1:{srv.getsockname()[1]}/v1")
        headers = make_user("alice")
        r = app.test_client().post("/v1/completions", json={"prompt": "Hi"}, headers=headers)
        assert r.status_code == 504 and r.json["error"]["code"] == "upstream_timeout"
        with database.session() as s:
            assert s.scalars(select(Call)).one().charged is False
            assert s.scalar(select(User.used)) == 0
    finally:
        stop.set()
        t.join()
        for c in conns:
            c.close()
        srv.close()
