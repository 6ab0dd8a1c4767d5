"""The OpenAI-compatible API over real HTTP: a gunicorn process serving the real
SmolLM2 model, the official ``openai`` SDK as the client, a raw socket for the
disconnect case, and a second service process using the first as its
``MODEL_BACKEND=openai`` upstream.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from base64 import b64encode
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import requests
from sqlalchemy import select

from model_api.models import Call, User
from model_api.services import api_keys
from model_api.services import auth as auth_service

from ..conftest import DEFAULT_PASSWORD, basic, free_port, wait_for

pytestmark = [pytest.mark.model, pytest.mark.slow]

SRC = str(Path(__file__).resolve().parents[2] / "src")


class Server:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path):
        self.url, self.proc, self.log = url, proc, log

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_server(db_url: str, log: Path, **env: str) -> Server:
    port = free_port()
    full_env = {
        **os.environ,
        # this checkout's code, whatever is installed in the venv
        "PYTHONPATH": os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p),
        "DATABASE_URL": db_url,
        "BIND": f"127.0.0.1:{port}",
        "ENV": "test",
        "RECOVER_JOBS_AT_START": "false",
        "MODEL_LOAD_AT_START": "true",
        "WEB_THREADS": "8",
        "LOG_LEVEL": "WARNING",
        **env,
    }
    out = log.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "python:model_api.gunicorn_conf", "model_api.wsgi:app"],
        env=full_env, stdout=out, stderr=subprocess.STDOUT,
    )
    server = Server(f"http://127.0.0.1:{port}", proc, log)

    def ready():
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {log.read_text()[-3000:]}")
        try:
            return requests.get(server.url + "/ready", timeout=2).status_code == 200
        except (requests.ConnectionError, requests.Timeout):
            # gunicorn's master accepts before its worker has imported the app: on a
            # loaded machine the first answer can take longer than the poll's timeout
            return False

    try:
        wait_for(ready, timeout=120, what="the server to be ready")
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def server(db_url, tmp_path_factory) -> Iterator[Server]:
    s = start_server(db_url, tmp_path_factory.mktemp("live") / "server.log")
    yield s
    s.stop()


@pytest.fixture
def user_key(database) -> tuple[str, str]:
    """A user with room for a few calls and an API key: (username, key)."""
    with database.session() as s:
        user = auth_service.create_user(s, "alice", DEFAULT_PASSWORD, quota=10)
        key = api_keys.create_key(s, user, "sdk").key
    return "alice", key


def sdk(server: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


def _call(database, call_id: str) -> Call:
    with database.session() as s:
        return s.get(Call, uuid.UUID(call_id.split("-", 1)[1]))


def test_sdk_chat_completion_matches_the_stored_row(server, user_key, database):
    client = sdk(server, user_key[1])
    resp = client.chat.completions.create(
        model="SmolLM2", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=6, temperature=0,
    )
    assert resp.object == "chat.completion"
    text = resp.choices[0].message.content
    assert text and resp.choices[0].finish_reason in ("stop", "length")
    assert resp.model.startswith("SmolLM2")
    row = _call(database, resp.id)
    assert (row.kind, row.status, row.response) == ("chat", "completed", text)
    assert (row.prompt_tokens, row.completion_tokens) == (resp.usage.prompt_tokens, resp.usage.completion_tokens)
    assert resp.usage.total_tokens == row.prompt_tokens + row.completion_tokens
    with database.session() as s:
        assert s.get(User, row.user_id).username == "alice"  # in alice's history


def test_sdk_streaming_chat_yields_deltas_then_usage(server, user_key, database):
    client = sdk(server, user_key[1])
    chunks = list(client.chat.completions.create(
        model="SmolLM2", messages=[{"role": "user", "content": "Tell me a joke."}],
        max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True},
    ))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) >= 2  # token by token, not one blob
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"] or finals == ["stop"]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    row = _call(database, chunks[0].id)
    assert row.response == "".join(deltas) and row.status == "completed"
    assert (row.prompt_tokens, row.completion_tokens) == (usage.prompt_tokens, usage.completion_tokens)
    assert usage.completion_tokens <= 8


def test_sdk_completions_and_models(server, user_key, database):
    client = sdk(server, user_key[1])
    models = client.models.list().data
    assert len(models) == 1 and models[0].id.startswith("SmolLM2")
    resp = client.completions.create(model=models[0].id, prompt="1, 2, 3, 4,", max_tokens=4, temperature=0)
    assert resp.object == "text_completion" and resp.choices[0].text
    row = _call(database, resp.id)
    assert (row.kind, row.prompt, row.response) == ("completion", "1, 2, 3, 4,", resp.choices[0].text)
    assert row.completion_tokens == resp.usage.completion_tokens
    streamed = list(client.completions.create(model=models[0].id, prompt="1, 2, 3, 4,", max_tokens=4,
                                              temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == resp.choices[0].text  # greedy


def test_sdk_sees_openai_errors(server, user_key, database):
    client = sdk(server, user_key[1])
    msgs = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="m", messages=msgs, n=2)
    assert bad.value.status_code == 400 and bad.value.body["type"] == "invalid_request_error"
    assert bad.value.body["param"] == "n"
    with pytest.raises(openai.AuthenticationError):
        sdk(server, "mk-not-a-key").models.list()
    with database.session() as s:
        s.get(User, s.scalar(select(User.id))).quota = 0
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model="m", messages=msgs, max_tokens=1)
    assert limited.value.body["code"] == "insufficient_quota"
    with database.session() as s:
        assert s.scalars(select(Call)).all() == []  # refusals write no rows


def _sse_events(lines) -> list:
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:])
            for line in lines if line.startswith("data: ")]


def test_call_model_streams_over_http(server, database):
    with database.session() as s:
        auth_service.create_user(s, "bob", DEFAULT_PASSWORD, quota=2)
    with requests.post(server.url + "/call_model", json={"prompt": "Hi", "max_tokens": 5, "temperature": 0,
                                                          "stream": True},
                       headers=basic("bob"), stream=True, timeout=120) as r:
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        assert r.headers["X-RateLimit-Remaining"] == "1"
        events = _sse_events(r.iter_lines(decode_unicode=True))
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])
    row = _call(database, events[0]["id"])
    assert (row.kind, row.status, row.response) == ("stream", "completed", text)
    assert events[-2]["usage"]["completion_tokens"] == row.completion_tokens
    plain = requests.post(server.url + "/call_model", json={"prompt": "Hi", "max_tokens": 2},
                          headers=basic("bob"), timeout=120)
    assert plain.status_code == 201 and "response" in plain.json()  # the seed's reply is unchanged


def test_client_disconnect_stops_the_model_and_keeps_a_cut_short_row(server, database):
    with database.session() as s:
        auth_service.create_user(s, "carol", DEFAULT_PASSWORD, quota=2)
    # counting has no natural end, so only max_tokens (1000) or the disconnect can stop it
    body = json.dumps({"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 1000, "temperature": 0,
                       "stream": True}).encode()
    token = b64encode(f"carol:{DEFAULT_PASSWORD}".encode()).decode()
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=120)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Basic {token}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    )
    received = b""
    while b'"text":"' not in received.split(b"\r\n\r\n", 1)[-1]:
        chunk = sock.recv(4096)
        assert chunk, "server closed the stream before the first token"
        received += chunk
    assert received.startswith(b"HTTP/1.1 200")
    first = json.loads(received.split(b"data: ", 1)[1].split(b"\n", 1)[0])
    call_id = first["id"]
    # the first token is here while the model is still generating (no buffering to the end)
    assert _call(database, call_id).status == "running"
    sock.close()

    row = wait_for(lambda: (c := _call(database, call_id)).status != "running" and c, timeout=120,
                   what="the cut-short call to be recorded")
    assert (row.status, row.finish_reason, row.error) == ("cancelled", "cancelled", "client disconnected")
    assert 1 <= row.completion_tokens < 1000  # the model stopped early
    assert row.response and row.response.startswith(first["choices"][0]["text"])
    assert row.charged is True  # documented: the unit is kept
    with database.session() as s:
        assert s.scalar(select(User.used).where(User.username == "carol")) == 1


def test_second_instance_uses_the_first_as_its_openai_backend(server, database, tmp_path):
    with database.session() as s:
        relay = auth_service.create_user(s, "relay", DEFAULT_PASSWORD, quota=10)
        relay_key = api_keys.create_key(s, relay, "instance-2").key
        auth_service.create_user(s, "dave", DEFAULT_PASSWORD, quota=5)
        dave_key = api_keys.create_key(s, s.scalar(select(User).where(User.username == "dave")), "sdk").key
    front = start_server(database.url, tmp_path / "front.log", MODEL_BACKEND="openai",
                         MODEL_BASE_URL=server.url + "/v1", MODEL_API_KEY=relay_key)
    try:
        r = requests.post(front.url + "/call_model", json={"prompt": "Hi", "max_tokens": 5, "temperature": 0},
                          headers=basic("dave"), timeout=120)
        assert r.status_code == 201, r.text
        assert r.json()["model"].startswith("SmolLM2")  # named by the upstream
        chunks = list(sdk(front, dave_key).chat.completions.create(
            model="any", messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0,
            stream=True, stream_options={"include_usage": True}))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == r.json()["response"]  # greedy: same text through either path
        with database.session() as s:
            rows = [(c.user.username, c.kind, c) for c in s.scalars(select(Call).order_by(Call.created_at))]
        # each client call is one row on the front and one (of the relay user) on the upstream
        assert sorted((u, k) for u, k, _ in rows) == [("dave", "chat"), ("dave", "sync"),
                                                       ("relay", "chat"), ("relay", "chat")]
        front_chat = next(c for u, k, c in rows if (u, k) == ("dave", "chat"))
        upstream_rows = [c for u, _, c in rows if u == "relay"]
        assert front_chat.response == streamed and front_chat.status == "completed"
        assert [c.response for c in upstream_rows] == [r.json()["response"], streamed]
        # token counts on the front come from the upstream's usage, in its one answer or its stream
        front_sync = next(c for u, k, c in rows if (u, k) == ("dave", "sync"))
        assert (front_sync.prompt_tokens, front_sync.completion_tokens) == (
            upstream_rows[0].prompt_tokens, upstream_rows[0].completion_tokens)
        assert front_chat.completion_tokens == chunks[-1].usage.completion_tokens
        assert all(c.status == "completed" for c in upstream_rows)
        with database.session() as s:
            used = dict(s.execute(select(User.username, User.used)).all())
        assert used["dave"] == 2 and used["relay"] == 2  # both instances metered their own client
    finally:
        front.stop()
