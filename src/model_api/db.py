"""SQLAlchemy 2.0 plumbing shared by the web app, the CLI and workers (no Flask here)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, DateTime, MetaData, create_engine, event
from sqlalchemy.engine import Connection
from sqlalchemy.engine import Engine as SAEngine
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

log = logging.getLogger(__name__)

# Named constraints make Alembic migrations reproducible across databases.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: DateTime(timezone=True), dict[str, Any]: JSON}


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything we store is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


class Database:
    """One engine + session factory per process.

    Nothing waits on the database for long: PostgreSQL connections open within
    ``connect_timeout`` seconds, every statement ends within
    ``statement_timeout_ms`` (0: no limit), and a pooled connection is handed out
    within ``pool_timeout`` seconds. Each limit raises an SQLAlchemy
    ``OperationalError`` / ``TimeoutError``, which the API answers with 503
    ``database_unavailable``. Statement parameters (prompts, responses) never
    appear in exception messages, hence never in logs (``hide_parameters``).
    """

    def __init__(self, url: str, *, connect_timeout: int = 5, statement_timeout_ms: int = 10_000,
                 pool_timeout: float = 5.0, **engine_kwargs: Any):
        self.url = url
        engine_kwargs.setdefault("hide_parameters", True)
        sqlite = url.startswith("sqlite")
        if sqlite:
            path = url.split("///", 1)[-1] if "///" in url else ""
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                engine_kwargs.setdefault("pool_timeout", pool_timeout)  # a file: a QueuePool
            engine_kwargs.setdefault("connect_args", {"check_same_thread": False, "timeout": 30})
        else:
            engine_kwargs.setdefault("pool_pre_ping", True)
            engine_kwargs.setdefault("pool_timeout", pool_timeout)
            engine_kwargs.setdefault("pool_size", 10)
            engine_kwargs.setdefault("max_overflow", 20)
            if url.startswith("postgresql"):
                engine_kwargs["connect_args"] = {
                    **postgres_connect_args(connect_timeout, statement_timeout_ms),
                    **engine_kwargs.get("connect_args", {}),
                }
        self.engine: SAEngine = create_engine(url, **engine_kwargs)
        if url.startswith("postgresql") and statement_timeout_ms:
            # the server's statement_timeout plus a grace: the watchdog only acts
            # when the server itself cannot (it no longer answers at all)
            SilentServerWatchdog(statement_timeout_ms / 1000 + 2.0).watch(self.engine)
        if sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self.sessionmaker = sessionmaker(self.engine, expire_on_commit=False)
        # autocommit() on PostgreSQL: the same pool, each statement committing on its own
        # (SQLite's runs on the engine itself: see autocommit())
        self._autocommit_engine: SAEngine | None = (
            None if sqlite else self.engine.execution_options(isolation_level="AUTOCOMMIT"))

    @classmethod
    def from_settings(cls, settings: Any) -> Database:
        """The database of a :class:`~model_api.settings.Settings`, with its timeouts."""
        return cls(
            settings.sqlalchemy_url,
            connect_timeout=settings.database_connect_timeout_seconds,
            statement_timeout_ms=settings.database_statement_timeout_ms,
            pool_timeout=settings.database_pool_timeout_seconds,
        )

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error."""
        session = self.sessionmaker()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    @contextmanager
    def autocommit(self) -> Iterator[Connection]:
        """A connection for a few statements that need no transaction of their own.

        For the per-request hot path, where each step is one statement (look up
        credentials, claim an idempotency key): on PostgreSQL every statement is
        its own transaction, since a transaction around a single statement would
        cost two extra round trips to the server and buy nothing. SQLite's driver
        already runs a read on its own and opens a transaction only for a write,
        which commits when the block ends (or rolls back if it raises); switching
        its connection to autocommit mode and back cost more than the lookup itself
        (~0.2 ms a request on a 2-core machine: bench/RESULTS.md)."""
        if self._autocommit_engine is None:
            with self.engine.begin() as conn:
                yield conn
        else:
            with self._autocommit_engine.connect() as conn:
                yield conn

    def dispose(self) -> None:
        self.engine.dispose()


class SilentServerWatchdog:
    """Ends a statement the server never answers: a client-side statement timeout.

    ``statement_timeout`` is the server's, and ``connect_timeout`` covers only
    opening a connection, so an open connection to a server that stopped
    answering (a network path that swallows traffic, a frozen host) would hold
    its request thread, and soon every thread, for as long as TCP takes to give
    up. A statement (or the pool's pre-ping) still running ``limit`` seconds
    after it began has its socket shut down from this thread: the driver then
    fails it at once ("server closed the connection"), SQLAlchemy invalidates
    the connection, and the API answers 503 ``database_unavailable``.
    """

    def __init__(self, limit: float):
        self.limit = limit
        self._running: dict[int, tuple[float, int]] = {}  # id(dbapi connection) -> (deadline, socket fd)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._thread_pid = -1

    def watch(self, engine: SAEngine) -> None:
        event.listen(engine, "before_cursor_execute", lambda conn, *_: self._begin(conn.connection.dbapi_connection))
        event.listen(engine, "after_cursor_execute", lambda conn, *_: self._end(conn.connection.dbapi_connection))
        event.listen(engine, "handle_error", lambda ctx: self._end(getattr(ctx.connection, "connection", None)
                                                                    and ctx.connection.connection.dbapi_connection))
        ping = engine.dialect.do_ping

        def guarded_ping(dbapi_connection: Any) -> bool:
            self._begin(dbapi_connection)
            try:
                return ping(dbapi_connection)
            finally:
                self._end(dbapi_connection)

        engine.dialect.do_ping = guarded_ping  # type: ignore[method-assign]

    def _begin(self, dbapi_connection: Any) -> None:
        fd = getattr(getattr(dbapi_connection, "pgconn", None), "socket", None)
        if fd is None:
            return
        with self._lock:
            self._running[id(dbapi_connection)] = (time.monotonic() + self.limit, fd)
            if self._thread is None or not self._thread.is_alive() or self._thread_pid != os.getpid():
                self._thread_pid = os.getpid()  # threads do not survive a fork: start one per process
                self._thread = threading.Thread(target=self._run, name="db-watchdog", daemon=True)
                self._thread.start()

    def _end(self, dbapi_connection: Any) -> None:
        if dbapi_connection is not None:
            with self._lock:
                self._running.pop(id(dbapi_connection), None)

    def _run(self) -> None:
        while True:
            time.sleep(min(0.5, self.limit / 4))
            now = time.monotonic()
            # under the lock: the statement's own thread cannot return the
            # connection (whose fd could then be reused) while we shut it down
            with self._lock:
                for key, (deadline, fd) in list(self._running.items()):
                    if deadline > now:
                        continue
                    del self._running[key]
                    log.warning("database did not answer a statement in time; dropping its connection",
                                extra={"limit_seconds": self.limit})
                    try:
                        # a duplicate: shutting it down ends the connection, closing it leaves libpq's fd alone
                        with socket.socket(fileno=os.dup(fd)) as sock:
                            sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass


def postgres_connect_args(connect_timeout: int, statement_timeout_ms: int) -> dict[str, Any]:
    """psycopg connection arguments: libpq's connect timeout, and the server-side
    ``statement_timeout`` set once per connection at start-up (no extra round trip)."""
    args: dict[str, Any] = {"connect_timeout": connect_timeout}
    if statement_timeout_ms:
        args["options"] = f"-c statement_timeout={int(statement_timeout_ms)}"
    return args


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets readers proceed while one writer commits; foreign keys are off by default.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # In WAL mode, NORMAL syncs the log at checkpoints instead of at every commit, as
    # SQLite advises for WAL: a committed call survives the process being killed (the
    # log is in the OS's page cache), and only a crash of the machine itself may lose
    # the last commits. Each call commits twice on the request's path, and the fsync of
    # FULL cost 0.8 ms of a gateway call's p50 here (bench/RESULTS.md). SQLite is the
    # development database (ENV=production refuses it); PostgreSQL syncs every commit.
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()
