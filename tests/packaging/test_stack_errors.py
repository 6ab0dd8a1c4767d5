"""scripts/stack.sh says which step failed and why, in one sentence, before it
starts anything long-lived (no model needed)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest

from ..conftest import free_port, need, port_open

ROOT = Path(__file__).resolve().parents[2]
STACK = ROOT / "scripts" / "stack.sh"

pytestmark = [pytest.mark.postgres]


def _up(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CELERY_BROKER_URL", "STACK_ENV_FILE")}
    base.update(PYTHONPATH=str(ROOT / "src"), BIN=str(Path(sys.executable).parent),
                STACK_RUN_DIR=str(tmp_path / "run"), STACK_WORKER="off", PORT=str(free_port()),
                # real secrets: .env.example's placeholders are refused in production before any step runs
                SECRET_KEY=secrets.token_hex(32), ADMIN_PASSWORD=secrets.token_urlsafe(16), **env)
    return subprocess.run(["bash", str(STACK), "up"], env=base, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_a_missing_postgresql_role_is_one_sentence_naming_the_step(tmp_path, db_url):
    need(db_url.startswith("postgresql"), "needs PostgreSQL (set DATABASE_URL)")
    u = urlparse(db_url.replace("+psycopg", ""))
    need(port_open(u.hostname, u.port or 5432), "PostgreSQL not reachable")
    r = _up(tmp_path, DATABASE_URL=f"postgresql://no_such_role_h18:secret-pw@{u.hostname}:{u.port or 5432}/x")
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("stack: migrate failed: cannot use the database x on"), r.stderr
    assert 'role "no_such_role_h18" does not exist; create it' in last and "createuser" in last
    assert "Traceback" not in r.stderr and "secret-pw" not in r.stderr
    assert not (tmp_path / "run" / "api.pid").exists()  # nothing was started


def test_an_unreachable_database_is_one_sentence(tmp_path):
    port = free_port()  # nothing listens there
    r = subprocess.run(["bash", "-c", f"STACK_RUN_DIR={tmp_path}/run BIN={Path(sys.executable).parent} "
                        f"STACK_CONNECT_TIMEOUT=2 DATABASE_URL=postgresql://u@127.0.0.1:{port}/db bash {STACK} up"],
                       capture_output=True, text=True, timeout=90)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last == (f"stack: PostgreSQL is not reachable at 127.0.0.1:{port} after 2 s (DATABASE_URL): "
                    "start it there, or set DATABASE_URL"), r.stderr


def _bash(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f"set -euo pipefail; source {STACK}; RUN_DIR={tmp_path}; {script}"],
                          capture_output=True, text=True, timeout=60)


def test_a_process_counts_as_running_by_its_start_time_not_its_command_line(tmp_path):
    """The old check matched /proc/PID/cmdline against gunicorn|model-api|celery: a
    process looked at before it had exec'd (or any other command) was taken for
    dead, and `up` stopped the stack with an empty log."""
    r = _bash("start_bg worker sleep 30; running worker && echo alive-at-once; "
              "kill $(pid_of worker); wait $(pid_of worker) 2>/dev/null || true; "
              "running worker || echo dead-after-kill", tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["alive-at-once", "dead-after-kill"]
    # a pid file whose pid now belongs to another process (same pid, other start time) is not ours
    r = _bash("echo \"$$ 1\" > $RUN_DIR/api.pid; running api || echo not-ours; "
              "echo \"$$ $(proc_start $$)\" > $RUN_DIR/api.pid; running api && echo ours", tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["not-ours", "ours"]
