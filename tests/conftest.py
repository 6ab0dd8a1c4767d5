"""Shared fixtures: a migrated database (PostgreSQL when DATABASE_URL names one,
a SQLite file otherwise), an app factory, a client and an auth helper.

Integration tests that need PostgreSQL or Redis skip with a visible reason when
those are missing, and fail instead when ``CI`` is set.
"""

from __future__ import annotations

import base64
import os
import socket
import time
from collections.abc import Callable, Iterator
from urllib.parse import urlparse

import pytest
from flask.testing import FlaskClient
from sqlalchemy import create_engine, delete, text

from model_api import create_app
from model_api.db import Base, Database
from model_api.migrate import upgrade
from model_api.models import AdminEvent, Call, UsageDaily, UsageDay, User
from model_api.services import auth as auth_service

IN_CI = bool(os.environ.get("CI"))
DEFAULT_PASSWORD = "correct horse battery"


def need(condition: bool, reason: str) -> None:
    """Skip (locally) or fail (CI) when a real dependency is missing."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)")
    pytest.skip(reason)


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def db_url(tmp_path_factory) -> str:
    url = os.environ.get("TEST_DATABASE_URL") or os.environ.get("DATABASE_URL")
    if not url:
        url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'test.sqlite3'}"
    if url.startswith(("postgresql", "postgres")):
        u = urlparse(url)
        need(port_open(u.hostname or "127.0.0.1", u.port or 5432), f"PostgreSQL not reachable at {u.hostname}:{u.port}")
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    # a clean schema, built by the migrations (as production does), not create_all
    engine = create_engine(url)
    with engine.begin() as conn:
        Base.metadata.drop_all(conn)
        conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
    engine.dispose()
    upgrade(url)
    return url


@pytest.fixture(scope="session")
def is_postgres(db_url) -> bool:
    return db_url.startswith("postgresql")


@pytest.fixture(scope="session")
def database(db_url) -> Iterator[Database]:
    d = Database(db_url)
    yield d
    d.dispose()


@pytest.fixture(autouse=True)
def _clean_tables(request) -> Iterator[None]:
    d: Database | None = None
    if "database" in request.fixturenames or "app" in request.fixturenames:
        d = request.getfixturevalue("database")
    yield
    if d is not None:
        with d.session() as s:
            s.execute(delete(Call))
            s.execute(delete(AdminEvent))
            s.execute(delete(UsageDaily))
            s.execute(delete(UsageDay))
            s.execute(delete(User))


class ServerLikeClient(FlaskClient):
    """Flask's test client, closing each reply once it is read, as a WSGI server does
    once it has written it: the request's access-log line and latency are written then
    (api/observability.py). A stream stays open for its test to read and close."""

    def open(self, *args, **kwargs):
        response = super().open(*args, **kwargs)
        if response.mimetype != "text/event-stream":
            response.get_data()
            response.close()
        return response


@pytest.fixture
def make_app(db_url) -> Iterator[Callable[..., object]]:
    apps = []

    def _make(**overrides):
        base = {
            "database_url": db_url,
            "model_load_at_start": False,
            "recover_jobs_at_start": False,
            "default_quota": 3,
            "env": "test",
        }
        base.update(overrides)
        app = create_app(base)
        app.test_client_class = ServerLikeClient
        apps.append(app)
        return app

    yield _make
    for app in apps:
        app.extensions["model_api"].close()


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


def basic(username: str, password: str = DEFAULT_PASSWORD) -> dict[str, str]:
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@pytest.fixture
def make_user(database) -> Callable[..., dict[str, str]]:
    """Create a user; returns ready-to-use Basic auth headers."""

    def _make(username: str = "alice", password: str = DEFAULT_PASSWORD, quota: int | None = None):
        with database.session() as s:
            auth_service.create_user(s, username, password, quota)
        return basic(username, password)

    return _make


def wait_for(predicate: Callable[[], object], timeout: float = 60, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


__all__ = ["basic", "free_port", "need", "port_open", "wait_for"]


@pytest.fixture
def live_server(db_url, tmp_path):
    """Factory: ``with live_server(workers=2, DEFAULT_QUOTA="3") as srv: srv.url``."""
    from .server import LiveServer

    def _make(workers: int = 1, threads: int = 8, **env: str) -> LiveServer:
        base = {"DATABASE_URL": db_url, "RECOVER_JOBS_AT_START": "false", "ENV": "test"}
        base.update({k.upper(): str(v) for k, v in env.items()})
        return LiveServer(free_port(), base, workers=workers, threads=threads,
                          log_path=tmp_path / f"server-{len(list(tmp_path.iterdir()))}.log")

    return _make


_SESSION_STARTED = time.time()


def pytest_terminal_summary(terminalreporter):
    """Measured times of the Docker image test (tests/packaging/test_image.py), if it ran in this session."""
    from pathlib import Path

    times = Path(__file__).resolve().parents[1] / "run" / "image-test-times.txt"
    if times.is_file() and times.stat().st_mtime >= _SESSION_STARTED:
        terminalreporter.write_sep("-", "Docker image test times (run/image-test-times.txt)")
        terminalreporter.write(times.read_text())
