"""The development database (SQLite): what a commit promises."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from sqlalchemy import text

from model_api.db import Database


def _pragma(db: Database, name: str):
    with db.autocommit() as conn:
        return conn.execute(text(f"PRAGMA {name}")).scalar()


def test_sqlite_commits_to_a_write_ahead_log_synced_at_checkpoints(tmp_path):
    db = Database(f"sqlite:///{tmp_path}/m.sqlite3")
    assert _pragma(db, "journal_mode") == "wal"
    assert _pragma(db, "synchronous") == 1  # NORMAL: no fsync at each commit
    assert _pragma(db, "foreign_keys") == 1
    db.dispose()


def test_a_sqlite_commit_survives_the_process_being_killed_right_after_it(tmp_path):
    # what NORMAL keeps: a commit is in the log when it returns, whatever happens to
    # the process next (only the machine crashing may lose it)
    url = f"sqlite:///{tmp_path}/m.sqlite3"
    writer = textwrap.dedent(f"""
        import os, signal
        from sqlalchemy import text
        from model_api.db import Database
        db = Database({url!r})
        with db.session() as s:
            s.execute(text("CREATE TABLE t (v TEXT)"))
        with db.session() as s:
            s.execute(text("INSERT INTO t VALUES ('kept')"))
        os.kill(os.getpid(), signal.SIGKILL)  # no close, no checkpoint
    """)
    proc = subprocess.run([sys.executable, "-c", writer], capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr.decode()
    db = Database(url)
    with db.autocommit() as conn:
        assert conn.execute(text("SELECT v FROM t")).scalars().all() == ["kept"]
    db.dispose()


def test_a_sqlite_autocommit_block_commits_its_writes_when_it_ends_and_none_if_it_raises(tmp_path):
    # the driver opens a transaction only for a write (no autocommit mode to switch to and back)
    db = Database(f"sqlite:///{tmp_path}/m.sqlite3")
    with db.autocommit() as conn:
        conn.execute(text("CREATE TABLE t (v TEXT)"))
    with db.autocommit() as conn:
        conn.execute(text("INSERT INTO t VALUES ('kept')"))
    with pytest.raises(RuntimeError), db.autocommit() as conn:
        conn.execute(text("INSERT INTO t VALUES ('dropped')"))
        raise RuntimeError("the block fails after its write")
    with db.engine.connect() as other:  # another connection sees what was committed
        assert other.execute(text("SELECT v FROM t")).scalars().all() == ["kept"]
    db.dispose()
