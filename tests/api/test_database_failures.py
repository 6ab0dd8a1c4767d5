"""The database misbehaving: unreachable, silent or slow is a quick 503 the client
may retry, liveness never waits for it, and no error path logs a prompt."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from model_api.api.errors import service_error
from model_api.db import Database

from ..conftest import basic, free_port

# without the timeouts under test a request to a silent database waits for ever: fail instead
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def silent_database() -> Iterator[str]:
    """A PostgreSQL URL whose "server" accepts connections and never says a word."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(64)  # the kernel completes handshakes; nobody ever reads or answers
        yield f"postgresql+psycopg://alice:pw@127.0.0.1:{srv.getsockname()[1]}/model_api"


@pytest.fixture
def refused_database() -> str:
    return f"postgresql+psycopg://alice:pw@127.0.0.1:{free_port()}/model_api"


CALLS = [
    ("/call_model", {"prompt": "Hi"}),
    ("/async_call_model", {"prompt": "Hi"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
]


def _database_unavailable(r, within: float, started: float) -> None:
    elapsed = time.monotonic() - started
    assert r.status_code == 503, r.get_data(as_text=True)
    assert r.json["error"]["code"] == "database_unavailable"
    assert int(r.headers["Retry-After"]) > 0
    assert elapsed < within, f"took {elapsed:.1f}s"


@pytest.mark.parametrize("path, body", CALLS)
@pytest.mark.parametrize("which", ["silent_database", "refused_database"])
def test_a_model_call_without_a_database_is_a_quick_503(request, make_app, which, path, body):
    url = request.getfixturevalue(which)
    client = make_app(database_url=url, database_connect_timeout_seconds=2).test_client()
    started = time.monotonic()
    r = client.post(path, json=body, headers=basic("alice"))
    _database_unavailable(r, within=6, started=started)


@pytest.mark.parametrize("which", ["silent_database", "refused_database"])
def test_health_check_never_touches_the_database(request, make_app, which):
    client = make_app(database_url=request.getfixturevalue(which), database_connect_timeout_seconds=2).test_client()
    started = time.monotonic()
    r = client.get("/health_check")
    assert r.status_code == 204
    assert time.monotonic() - started < 0.5


def test_a_statement_slower_than_the_statement_timeout_is_a_503(make_app, make_user, database, is_postgres):
    if not is_postgres:
        pytest.skip("statement_timeout is PostgreSQL's")
    headers = make_user("alice")
    client = make_app(database_statement_timeout_ms=300).test_client()
    with database.engine.connect() as locker:
        # hold a lock every read of the users table waits for
        locker.execute(text("LOCK TABLE users IN ACCESS EXCLUSIVE MODE"))
        started = time.monotonic()
        try:
            r = client.post("/call_model", json={"prompt": "Hi"}, headers=headers)
        finally:
            locker.rollback()
    _database_unavailable(r, within=3, started=started)


def test_connections_carry_the_statement_timeout(make_app, is_postgres):
    if not is_postgres:
        pytest.skip("statement_timeout is PostgreSQL's")
    db = make_app(database_statement_timeout_ms=1234).extensions["model_api"].db
    with db.engine.connect() as conn:
        assert conn.execute(text("SHOW statement_timeout")).scalar() == "1234ms"


def test_no_free_pooled_connection_is_a_503(db_url):
    db = Database(db_url, pool_timeout=0.2, pool_size=1, max_overflow=0)
    try:
        with db.engine.connect():
            with pytest.raises(sa_exc.TimeoutError) as caught:
                db.engine.connect()
        error = service_error(caught.value)
        assert (error.status_code, error.extra_data["code"]) == (503, "database_unavailable")
    finally:
        db.dispose()


# --- (8) no prompt in any log line, even when the database refuses the call ----------------------

SECRET = "my-secret-prompt-5f0c"

_REFUSE = {
    "postgresql": [
        "CREATE OR REPLACE FUNCTION test_refuse_calls() RETURNS trigger AS $$ "
        "BEGIN RAISE EXCEPTION 'refused by the test'; END $$ LANGUAGE plpgsql",
        "CREATE TRIGGER test_refuse_calls BEFORE INSERT ON calls FOR EACH ROW EXECUTE FUNCTION test_refuse_calls()",
    ],
    "sqlite": ["CREATE TRIGGER test_refuse_calls BEFORE INSERT ON calls "
               "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"],
}
_ALLOW = {
    "postgresql": ["DROP TRIGGER IF EXISTS test_refuse_calls ON calls", "DROP FUNCTION IF EXISTS test_refuse_calls()"],
    "sqlite": ["DROP TRIGGER IF EXISTS test_refuse_calls"],
}


@pytest.fixture
def calls_refused(database) -> Iterator[None]:
    """The database refuses every new call row (a real error from the real database)."""
    dialect = database.engine.dialect.name
    with database.engine.begin() as conn:
        for sql in _REFUSE[dialect]:
            conn.execute(text(sql))
    yield
    with database.engine.begin() as conn:
        for sql in _ALLOW[dialect]:
            conn.execute(text(sql))


@pytest.mark.parametrize("path, body", [
    ("/async_call_model", {"prompt": SECRET}),
    ("/call_model", {"prompt": SECRET, "max_tokens": 1, "temperature": 0}),
])
def test_a_database_error_during_a_call_logs_no_prompt(client, make_user, calls_refused, caplog, path, body):
    headers = make_user("alice")
    with caplog.at_level(logging.DEBUG):
        r = client.post(path, json=body, headers=headers)
    assert r.status_code == 500 and "Traceback" not in r.get_data(as_text=True)
    assert any(rec.exc_info for rec in caplog.records), "the error was logged with its traceback"
    assert "calls" in caplog.text  # the statement is there to debug with...
    assert SECRET not in caplog.text  # ...but never its parameters
    assert SECRET not in r.get_data(as_text=True)
