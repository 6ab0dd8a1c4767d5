"""OpenAIEngine: how upstream answers and failures map to engine errors.

Upstreams are real HTTP servers on local ports (tests/upstream.py), scripted
to give the answers a real model server is hard to provoke into; unreachable
and silent upstreams are real sockets. Two real service processes talking to
each other are in tests/live/test_openai_live.py.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from typing import Any

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
from model_api.engine import remote, tools
from model_api.engine.remote import OpenAIEngine
from model_api.models import Call, User

from ..conftest import free_port
from ..upstream import HANG_UP, Asked, Reply, event_stream, sse_data, upstream

REQ = GenerationRequest.single_prompt("Hi", SamplingParams(max_tokens=4, temperature=0))


@pytest.fixture
def engine_for() -> Iterator[Callable[..., OpenAIEngine]]:
    """``engine_for(answer, **kw)``: an OpenAIEngine in front of a real upstream answering with ``answer``."""
    with ExitStack() as stack:
        def make(answer: Callable[[Asked], Reply], **kw: Any) -> OpenAIEngine:
            engine = OpenAIEngine(stack.enter_context(upstream(answer)), **kw)
            stack.callback(engine.close)
            return engine

        yield make


def start(engine, request):
    return engine.stream(engine.prepare(request))


def start_whole(engine, request=REQ):
    return engine.stream(engine.prepare(request), incremental=False)


#: a streamed call, and a whole reply (a non-streamed sync call: sent and read by the caller's thread)
EITHER_WAY = pytest.mark.parametrize("begin", [start, start_whole], ids=["streamed", "whole"])


def prepared_tokens(engine, request) -> int:
    return engine.prepare(request).n_tokens


def test_streams_deltas_and_takes_usage_and_model_from_the_upstream(engine_for):
    seen = {}

    def answer(asked: Asked) -> Reply:
        if asked.path == "/v1/models":
            return Reply(body={"object": "list", "data": [{"id": "up-model"}]})
        seen.update(asked.json, auth=asked.headers.get("authorization"), path=asked.path)
        return event_stream(
            {"model": "up-model", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
            {"model": "up-model", "choices": [{"index": 0, "delta": {"content": "Bon"}}]},
            {"model": "up-model", "choices": [{"index": 0, "delta": {"content": "jour"}, "finish_reason": "length"}]},
            {"model": "up-model", "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 2}},
            b"[DONE]")

    eng = engine_for(answer, api_key="sk-up")
    gen = start(eng, REQ)
    assert list(gen) == ["Bon", "jour"]
    r = gen.result
    assert (r.text, r.prompt_tokens, r.completion_tokens, r.finish_reason, r.model) == (
        "Bonjour", 11, 2, "length", "up-model")
    assert seen["path"] == "/v1/chat/completions"
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
    (500, b"<html>oops</html>", {}, UpstreamError),
])
def test_upstream_error_statuses_map_to_engine_errors(engine_for, status, body, headers, error):
    eng = engine_for(lambda asked: Reply(status, body, headers), model_name="m")
    with pytest.raises(error) as info:
        list(start(eng, REQ))
    if status == 422:
        assert (info.value.prompt_tokens, info.value.context_size) == (3000, 2048)
    if status == 503:
        assert info.value.retry_after == 7
    if status == 500:
        assert "oops" in str(info.value)
    assert not isinstance(info.value, UpstreamTimeout) or status == 504


def test_only_the_start_of_an_error_answer_is_read(engine_for):
    huge = b'{"error": {"message": "' + b"x" * (8 * 1024 * 1024) + b'"}}'
    eng = engine_for(lambda asked: Reply(500, huge), model_name="m")
    with pytest.raises(UpstreamError, match=r"answered 500: \{\"error\": \{\"message\": \"xxx") as info:
        list(start(eng, REQ))
    assert len(str(info.value)) < 1000  # not the whole answer: it is not JSON from its first 64 KiB on


def test_a_model_list_the_upstream_refuses_is_an_upstream_error(engine_for):
    eng = engine_for(lambda asked: Reply(401, {"error": {"message": "bad key"}}))  # no MODEL_NAME: asks /models
    with pytest.raises(UpstreamError, match="answered 401: bad key"):
        eng.upstream_model()


@pytest.mark.parametrize("then,error", [
    (sse_data(b"{not json"), "malformed"),
    # an upstream is not trusted to send OpenAI's shapes: a wrong type is its error, not our crash
    (sse_data({"choices": [{"delta": {"content": 5}}]}), "malformed event: its text is a int"),
    (sse_data({"choices": [{"text": ["a"]}]}), "malformed event: its text is a list"),
    (sse_data([1, 2]), "malformed event: a list instead of an object"),
    (sse_data({"choices": "abc"}), "malformed event: its choices are not"),
    (sse_data({"choices": ["abc"]}), "malformed event: its choices are not"),
    (sse_data({"choices": [{"delta": "abc"}]}), "malformed event: its delta is not"),
    (sse_data({"choices": [{"delta": {"tool_calls": 5}}]}), "malformed event: its delta is not"),
    (sse_data({"choices": [{"delta": {}, "finish_reason": ["stop"]}]}), "malformed event: its finish_reason"),
    (sse_data({"choices": [{"delta": {"tool_calls": ["f"]}}]}), "malformed event: its tool call is not"),
    (sse_data({"choices": [{"delta": {"tool_calls": [{"function": "f"}]}}]}), "malformed event: its tool call is not"),
    (sse_data({"choices": [{"delta": {"tool_calls": [{"function": {"name": 7}}]}}]}),
     "malformed event: its tool call's name is a int"),
    (sse_data({"choices": [{"delta": {"tool_calls": [{"function": {"arguments": {"a": 1}}}]}}]}),
     "malformed event: its tool call's arguments is a dict"),
    (sse_data({"choices": [], "usage": "many"}), "malformed event: its usage"),
    (sse_data({"choices": [], "model": {"a": 1}}), "malformed event: its model is not a string"),
    (sse_data({"error": {"message": "out of memory"}}), "failed mid-stream: out of memory"),
    (HANG_UP, "cannot talk to"),
])
def test_a_stream_that_breaks_after_a_delta_is_an_upstream_error_after_it(engine_for, then, error):
    eng = engine_for(lambda asked: Reply(body=[sse_data({"choices": [{"delta": {"content": "a"}}]}), then]),
                     model_name="m")
    gen = start(eng, REQ)
    assert next(gen) == "a"
    with pytest.raises(UpstreamError, match=error):
        next(gen)


@pytest.mark.parametrize("usage", [{"prompt_tokens": "abc", "completion_tokens": -3},
                                   {"prompt_tokens": True, "completion_tokens": 7.5}])
def test_token_counts_an_upstream_reports_that_are_not_counts_are_estimated(engine_for, usage):
    eng = engine_for(lambda asked: event_stream({"choices": [{"delta": {"content": "a"}}]},
                                           {"choices": [{"delta": {"content": "b"}}]},
                                           {"choices": [], "usage": usage}, b"[DONE]"), model_name="m")
    gen = start(eng, REQ)
    assert list(gen) == ["a", "b"]
    assert gen.result.prompt_tokens > 0 and gen.result.completion_tokens == 2  # the estimate and the pieces


def test_an_unpaired_surrogate_from_the_upstream_comes_out_as_a_replacement_character(engine_for):
    # JSON can carry "\ud800", which no encoder takes: the stream and the row would break on it
    eng = engine_for(lambda asked: event_stream({"choices": [{"delta": {"content": "a\ud800b"}}]},
                                           {"choices": [{"delta": {"content": "\udfff"}}]}, b"[DONE]"),
                     model_name="m")
    gen = start(eng, REQ)
    assert list(gen) == ["a\ufffdb", "\ufffd"]
    assert gen.result.text == "a\ufffdb\ufffd"


def test_an_upstream_that_stops_sending_mid_stream_is_a_timeout(engine_for):
    stalled = threading.Event()

    def events() -> Iterable[bytes]:
        yield sse_data({"choices": [{"delta": {"content": "a"}}]})
        stalled.wait(10)  # longer than the engine waits for its next piece
        yield sse_data(b"[DONE]")

    gen = start(engine_for(lambda asked: Reply(body=events()), model_name="m", timeout=0.5), REQ)
    try:
        assert next(gen) == "a"
        with pytest.raises(UpstreamTimeout):
            next(gen)
    finally:
        stalled.set()


@EITHER_WAY
def test_the_upstream_request_goes_out_when_the_generation_is_made_not_at_its_first_read(engine_for, begin):
    # so the caller's database work overlaps the upstream's first token (engine/remote.py)
    asked = threading.Event()

    def answer(_asked: Asked) -> Reply:
        asked.set()
        return event_stream({"choices": [{"delta": {"content": "a"}}]}, b"[DONE]")

    gen = begin(engine_for(answer, model_name="m"), REQ)
    assert asked.wait(5), "nothing was sent before the first read"
    assert list(gen) == ["a"] and gen.result.finish_reason == "stop"


def test_each_event_reaches_the_caller_as_it_arrives_not_when_a_buffer_fills(engine_for):
    read_first = threading.Event()

    def events() -> Iterable[bytes]:
        yield sse_data({"choices": [{"delta": {"content": "first"}}]})
        # the second event is sent only once the caller has the first
        assert read_first.wait(10)
        yield sse_data({"choices": [{"delta": {"content": "second"}}]}) + sse_data(b"[DONE]")

    gen = start(engine_for(lambda asked: Reply(body=events()), model_name="m"), REQ)
    assert next(gen) == "first"
    read_first.set()
    assert list(gen) == ["second"]


@pytest.mark.parametrize("ending", [b"\n", b"\r\n"])
def test_events_split_across_pieces_and_either_line_ending_are_read_whole(engine_for, ending):
    text = ("data: " + json.dumps({"choices": [{"delta": {"content": "h\u00e9llo"}}]}) + "\n\ndata: [DONE]\n\n")
    raw = text.replace("\n", ending.decode()).encode()
    pieces = [raw[i:i + 7] for i in range(0, len(raw), 7)]  # "é" is split across two pieces too
    gen = start(engine_for(lambda asked: Reply(body=pieces), model_name="m"), REQ)
    assert list(gen) == ["h\u00e9llo"] and gen.result.finish_reason == "stop"


def test_an_endless_line_is_an_upstream_error_not_a_memory_leak(engine_for, monkeypatch):
    monkeypatch.setattr(remote, "MAX_LINE_BYTES", 100_000)
    eng = engine_for(lambda asked: Reply(body=(b"data: " + b"x" * 10_000 for _ in range(1_000))), model_name="m")
    with pytest.raises(UpstreamError, match="a line of over 100000 bytes"):
        list(start(eng, REQ))


@EITHER_WAY
def test_calls_one_after_another_share_one_kept_alive_connection(engine_for, begin):
    ports = []

    def answer(asked: Asked) -> Reply:
        ports.append(asked.client_port)
        return event_stream({"choices": [{"delta": {"content": "a"}}]}, b"[DONE]")

    eng = engine_for(answer, model_name="m")
    for _ in range(3):
        assert list(begin(eng, REQ)) == ["a"]
    assert len(ports) == 3 and len(set(ports)) == 1


def test_many_streams_at_once_each_keep_their_connection(engine_for, caplog):
    n = 40  # more than a small pool would keep
    all_open = threading.Barrier(n, timeout=20)

    def events() -> Iterable[bytes]:
        yield sse_data({"choices": [{"delta": {"content": "a"}}]})
        all_open.wait()  # every stream is open at once
        yield sse_data(b"[DONE]")

    eng = engine_for(lambda asked: Reply(body=events()), model_name="m")
    for _ in range(2):
        gens = [start(eng, REQ) for _ in range(n)]
        assert [list(g) for g in gens] == [["a"]] * n
        all_open.reset()
    assert not [r for r in caplog.records if "pool is full" in r.getMessage()]


def test_closing_mid_stream_stops_reading_the_upstream_and_keeps_what_came(engine_for):
    sent = []

    def slow_events():
        for i in range(200):
            sent.append(i)
            yield sse_data({"choices": [{"delta": {"content": f"t{i} "}}]})
            time.sleep(0.01)
        yield sse_data(b"[DONE]")

    gen = start(engine_for(lambda asked: Reply(body=slow_events()), model_name="m"), REQ)
    assert next(gen) == "t0 "
    gen.close()
    assert gen.result is not None and gen.result.finish_reason == "cancelled"
    assert gen.result.text.startswith("t0 ")
    time.sleep(0.2)  # the upstream's next writes find the connection closed, and it stops
    assert len(sent) < 100
    assert list(gen) == []


@EITHER_WAY
def test_the_proxy_the_environment_names_is_used(monkeypatch, engine_for, begin):
    # the scripted upstream plays the proxy: a forward proxy is asked for the whole URL
    seen = []

    def proxy(asked: Asked) -> Reply:
        seen.append(asked.path)
        return event_stream({"choices": [{"delta": {"content": "via proxy"}}]}, b"[DONE]")

    with upstream(proxy) as proxy_url:
        for name in ("NO_PROXY", "no_proxy", "http_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", proxy_url.removesuffix("/v1"))
        eng = OpenAIEngine("http://upstream.invalid/v1", model_name="m")
        assert list(begin(eng, REQ)) == ["via proxy"]
        monkeypatch.setenv("NO_PROXY", "upstream.invalid")
        with pytest.raises(UpstreamError):  # not through the proxy: the name does not resolve
            list(begin(OpenAIEngine("http://upstream.invalid/v1", model_name="m", connect_timeout=2), REQ))
    assert seen == ["http://upstream.invalid/v1/chat/completions"]


def _read_request(conn: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, rest = data.split(b"\r\n\r\n", 1)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(rest) < length:
        rest += conn.recv(65536)


@EITHER_WAY
def test_a_kept_alive_connection_the_upstream_closed_is_retried_on_a_new_one(begin):
    # a real socket: the first connection answers, then reads the next request and hangs
    # up without answering (what a server closing an idle keep-alive connection looks like)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    body = sse_data({"choices": [{"delta": {"content": "ok"}}]}, b"[DONE]")
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
        assert list(begin(eng, REQ)) == ["ok"]
        assert list(begin(eng, REQ)) == ["ok"]
        assert len(accepted) == 2
    finally:
        srv.close()
        for c in accepted:
            c.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_an_https_upstream_is_verified_against_the_ca_bundle_ssl_cert_file_names(monkeypatch, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=upstream",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    answer = lambda asked: event_stream({"choices": [{"delta": {"content": "secure"}}]}, b"[DONE]")  # noqa: E731
    with upstream(answer, tls=(str(cert), str(key))) as url:
        monkeypatch.delenv("SSL_CERT_DIR", raising=False)
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)
        with pytest.raises(UpstreamError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            list(start(OpenAIEngine(url, model_name="m", timeout=5), REQ))  # self-signed: not in certifi's bundle
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        assert list(start(OpenAIEngine(url, model_name="m", timeout=5), REQ)) == ["secure"]


def test_check_is_a_cheap_character_guard():
    eng = OpenAIEngine(f"http://127.0.0.1:{free_port()}/v1", model_name="m", context_size=128)  # never asked
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


# --- a whole reply (a non-streamed sync call) is asked for as one answer --------------------------

def whole(content: Any = "Bonjour", **extra: Any) -> dict:
    """A non-streamed chat completion, as OpenAI's API answers one."""
    return {"model": "up-model", "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "length"}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 2}, **extra}


def test_a_whole_reply_is_one_answer_on_a_kept_alive_connection(engine_for):
    asked_for, ports = [], []

    def answer(asked: Asked) -> Reply:
        asked_for.append(asked.json)
        ports.append(asked.client_port)
        return Reply(body=whole())

    eng = engine_for(answer, model_name="m")
    for _ in range(2):
        gen = start_whole(eng)
        assert list(gen) == ["Bonjour"]
        r = gen.result
        assert (r.text, r.prompt_tokens, r.completion_tokens, r.finish_reason, r.model) == (
            "Bonjour", 11, 2, "length", "up-model")
    assert all("stream" not in body and "stream_options" not in body for body in asked_for)
    assert asked_for[0]["max_tokens"] == 4 and asked_for[0]["messages"] == [{"role": "user", "content": "Hi"}]
    assert len(set(ports)) == 1  # llama-server closes a connection after a stream, not after an answer


def test_a_whole_answer_carries_its_tool_calls_as_a_stream_does(engine_for):
    calls = [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}},
             {"id": "c2", "type": "function", "function": {"name": "neg", "arguments": '{"b": 2}'}}]
    answer = whole(None)
    answer["choices"][0]["message"]["tool_calls"] = calls
    eng = engine_for(lambda asked: Reply(body=answer) if "stream" not in asked.json else event_stream(
        *({"choices": [{"delta": {"tool_calls": [{**c, "index": i}]}}]} for i, c in enumerate(calls)),
        b"[DONE]"), model_name="m")
    whole_gen, streamed = start_whole(eng), start(eng, REQ)
    assert list(whole_gen) == list(streamed) and len(whole_gen.result.text) > 0
    assert whole_gen.result.text == streamed.result.text == tools.calls_text(
        [{"type": "function", "function": c["function"]} for c in calls])


@pytest.mark.parametrize("body,error", [
    (b"{not json", "malformed answer: b'{not json'"),
    ([1, 2], "malformed answer: a list instead of an object"),
    ({"choices": "abc"}, "malformed answer: its choices are not"),
    ({"choices": [{"message": "abc"}]}, "malformed answer: its delta is not an object"),
    (whole(5), "malformed answer: its text is a int"),
    (whole(None, usage=[1]), "malformed answer: its usage is not an object"),
    ({"choices": [{"message": {"tool_calls": [{"function": {"name": 7}}]}}]},
     "malformed answer: its tool call's name is a int"),
    ({"error": {"message": "out of memory"}}, "answered an error: out of memory"),
])
def test_a_whole_answer_of_the_wrong_shape_is_an_upstream_error(engine_for, body, error):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(UpstreamError, match=error):
        list(start_whole(engine_for(lambda asked: Reply(body=raw), model_name="m")))


def test_an_upstream_that_streams_when_asked_for_one_answer_is_read_as_a_stream(engine_for):
    eng = engine_for(lambda asked: event_stream({"choices": [{"delta": {"content": "a"}}]},
                                                {"choices": [{"delta": {"content": "b"}}]}, b"[DONE]"),
                     model_name="m")
    gen = start_whole(eng)
    assert "".join(gen) == "ab" and gen.result.text == "ab"


def test_a_whole_answer_too_big_to_hold_is_an_upstream_error(engine_for, monkeypatch):
    monkeypatch.setattr(remote, "MAX_LINE_BYTES", 100_000)
    eng = engine_for(lambda asked: Reply(body=whole("x" * 200_000)), model_name="m")
    with pytest.raises(UpstreamError, match="an answer of over 100000 bytes"):
        list(start_whole(eng))


@pytest.mark.parametrize("delay,incremental,answered", [
    (0.8, False, True),  # past MODEL_TIMEOUT_SECONDS, within it plus a quarter second per token asked for
    (0.8, True, False),  # a stream's first byte is due within MODEL_TIMEOUT_SECONDS
    (2.0, False, False),
])
def test_a_whole_answer_may_take_a_quarter_second_more_per_token_asked_for(engine_for, delay, incremental,
                                                                          answered):
    release = threading.Event()

    def answer(asked: Asked) -> Reply:
        release.wait(delay)
        return Reply(body=whole()) if "stream" not in asked.json else event_stream(
            {"choices": [{"delta": {"content": "Bonjour"}}]}, b"[DONE]")

    eng = engine_for(answer, model_name="m", timeout=0.5)  # REQ asks for 4 tokens: 0.5 + 1.0 s in all
    try:
        gen = eng.stream(eng.prepare(REQ), incremental=incremental)
        if answered:
            assert list(gen) == ["Bonjour"]
        else:
            with pytest.raises(UpstreamTimeout):
                list(gen)
    finally:
        release.set()


def test_closing_a_whole_reply_returns_before_the_upstream_answers(engine_for):
    arrived, release, answered = threading.Event(), threading.Event(), threading.Event()

    def answer(asked: Asked) -> Reply:
        arrived.set()
        release.wait(remote.CLOSE_WAIT_SECONDS - 2)  # a stream's close() would still be waiting then
        answered.set()
        return Reply(body=whole())

    gen = start_whole(engine_for(answer, model_name="m"))
    try:
        assert arrived.wait(5)
        gen.close()  # (nothing comes before a whole answer to stop at: it is dropped when it comes)
        assert not answered.is_set() and list(gen) == []
    finally:
        release.set()


def test_a_whole_reply_is_sent_and_read_by_the_callers_own_thread(engine_for):
    # no reader thread to hand the request to and the answer back from (engine/remote.py, _WholeAnswer)
    eng = engine_for(lambda asked: event_stream({"choices": [{"delta": {"content": "Bonjour"}}]}, b"[DONE]"),
                     model_name="m")
    before = set(threading.enumerate())
    assert list(start_whole(eng)) == ["Bonjour"]
    assert not [t for t in set(threading.enumerate()) - before if t.name.startswith("upstream-stream")]
    assert list(start(eng, REQ)) == ["Bonjour"]  # a stream has its reader (the check above can fail)
    assert [t for t in set(threading.enumerate()) - before if t.name.startswith("upstream-stream")]


def test_whole_replies_closed_unread_leave_the_pool_as_it_was(engine_for, caplog, monkeypatch):
    monkeypatch.setattr(remote, "POOL_CONNECTIONS", 4)
    ports = []

    def answer(asked: Asked) -> Reply:
        ports.append(asked.client_port)
        return Reply(body=whole())

    eng = engine_for(answer, model_name="m")
    for _ in range(9):  # more than the pool holds: a connection given back twice would overfill it
        start_whole(eng).close()
    deadline = time.monotonic() + 5
    while len(ports) < 9 and time.monotonic() < deadline:  # each was sent: the upstream reads it anyway
        time.sleep(0.01)
    ports.clear()
    assert [list(start_whole(eng)) for _ in range(3)] == [["Bonjour"]] * 3
    assert len(set(ports)) == 1  # and the pool still keeps a connection alive between calls
    assert not [r for r in caplog.records if "pool is full" in r.getMessage()]


def test_a_whole_reply_that_cannot_be_sent_fails_at_its_first_read_as_a_stream_does():
    # so the caller records the failure and refunds the unit the same way (services/calls.py)
    eng = OpenAIEngine(f"http://127.0.0.1:{free_port()}/v1", model_name="m", connect_timeout=2)
    gen = start_whole(eng)  # nothing listens: the request could not go out
    with pytest.raises(UpstreamError):
        next(gen)
    assert list(gen) == []
