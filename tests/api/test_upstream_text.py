"""Whatever a remote model's server sends, the caller gets a reply or a clear
error and the call's row reaches a final state: text no database or encoder
takes is stored as U+FFFD, and an event of the wrong shape is the upstream's
error (502, or an in-stream error after the first chunk), never our 500.
The upstream is a real HTTP server scripted per test (tests/upstream.py)."""

from __future__ import annotations

import json
from contextlib import ExitStack

import pytest
from sqlalchemy import select

from model_api.models import Call, CallStatus

from ..upstream import Asked, Reply, event_stream, upstream

CHAT = {"model": "remote", "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}
UNSTORABLE = [{"choices": [{"delta": {"content": "a\x00b"}}]}, {"choices": [{"delta": {"content": "\ud800"}}]}]


@pytest.fixture
def serve(make_app, tmp_path):
    """``serve(*events, whole=None)``: a test client whose model ``remote`` streams ``events``,
    then [DONE]; or, given ``whole``, answers a request for one answer (a non-streamed call) with it."""
    with ExitStack() as stack:
        def make(*events, whole=None):
            def answer(asked: Asked) -> Reply:
                if whole is not None and not asked.json.get("stream"):
                    return Reply(body=whole)
                return event_stream(*events, b"[DONE]")

            base = stack.enter_context(upstream(answer))
            path = tmp_path / "models.yaml"
            path.write_text(f"default: remote\nmodels:\n  remote:\n    backend: openai\n    base_url: {base}\n"
                            "    upstream_model: anything\n")
            return make_app(models_file=str(path), default_quota=5).test_client()

        yield make


def the_row(database) -> Call:
    with database.session() as s:
        (row,) = s.scalars(select(Call)).all()
        return row


def events_of(body: bytes) -> list:
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:])
            for line in body.decode().splitlines() if line.startswith("data: ")]


def test_a_reply_with_nul_and_an_unpaired_surrogate_is_answered_and_kept(serve, make_user, database):
    r = serve(*UNSTORABLE).post("/v1/chat/completions", json=CHAT, headers=make_user())
    assert r.status_code == 200
    assert r.json["choices"][0]["message"]["content"] == "a\x00b\ufffd"  # NUL is JSON's to carry
    row = the_row(database)
    assert (row.status, row.response) == (CallStatus.COMPLETED.value, "a\ufffdb\ufffd")


def test_a_whole_answer_with_them_is_answered_and_kept(serve, make_user, database):
    answer = {"model": "up", "usage": {"prompt_tokens": 3, "completion_tokens": 2},
              "choices": [{"message": {"role": "assistant", "content": "a\x00b\ud800"}, "finish_reason": "stop"}]}
    r = serve(whole=answer).post("/v1/chat/completions", json=CHAT, headers=make_user())
    assert r.status_code == 200 and r.json["choices"][0]["message"]["content"] == "a\x00b\ufffd"
    row = the_row(database)
    assert (row.status, row.response, row.completion_tokens) == (CallStatus.COMPLETED.value, "a\ufffdb\ufffd", 2)


def test_a_streamed_reply_with_them_reaches_its_end_and_is_kept(serve, make_user, database):
    r = serve(*UNSTORABLE).post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=make_user())
    events = events_of(r.data)
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"]) \
        == "a\x00b\ufffd"
    assert the_row(database).status == CallStatus.COMPLETED.value


@pytest.mark.parametrize("bad", [[1, 2], {"choices": [{"delta": "abc"}]}, {"choices": [{"delta": {"content": 5}}]}])
def test_a_malformed_event_before_the_first_token_is_a_502_refunded(serve, make_user, database, bad):
    client = serve(bad)
    headers = make_user()
    r = client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert r.status_code == 502 and r.json["error"]["code"] == "upstream_error"
    assert "malformed event" in r.json["error"]["message"]
    assert the_row(database).status == CallStatus.FAILED.value
    assert client.get("/me", headers=headers).json["quota"]["remaining"] == 5  # the unit came back


@pytest.mark.parametrize("bad", [[1, 2], {"choices": [{"message": "abc"}]}, {"choices": [{"message": {"content": 5}}]}])
def test_a_malformed_whole_answer_is_a_502_refunded(serve, make_user, database, bad):
    client = serve(whole=json.dumps(bad).encode())
    headers = make_user()
    r = client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert r.status_code == 502 and "malformed" in r.json["error"]["message"]
    assert the_row(database).status == CallStatus.FAILED.value
    assert client.get("/me", headers=headers).json["quota"]["remaining"] == 5


def test_a_malformed_event_after_the_first_chunk_is_an_error_event_and_the_end(serve, make_user, database):
    r = serve(UNSTORABLE[0], {"choices": "abc"}).post("/v1/chat/completions", json={**CHAT, "stream": True},
                                                       headers=make_user())
    events = events_of(r.data)
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "upstream_error"
    assert the_row(database).status == CallStatus.FAILED.value
