"""The model-api console command, through Click's runner and as a real subprocess."""

import os
import subprocess
import sys

import pytest
from sqlalchemy import select

from model_api.models import User
from model_api.services.auth import verify_password


@pytest.fixture
def cli(app):
    return app.test_cli_runner()


def test_users_lifecycle(cli, database):
    r = cli.invoke(args=["users", "create", "carol", "--password-stdin", "--quota", "7"], input="a long password\n")
    assert r.exit_code == 0, r.output
    with database.session() as s:
        u = s.scalars(select(User).where(User.username == "carol")).one()
        assert u.quota == 7 and u.password_hash.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
        assert verify_password(u.password_hash, "a long password")
    assert cli.invoke(args=["users", "create", "carol", "--password", "another one"]).exit_code != 0
    r = cli.invoke(args=["users", "set-quota", "carol", "9"])
    assert r.exit_code == 0, r.output
    r = cli.invoke(args=["users", "list"])
    assert "carol" in r.output and " 9 " in r.output
    r = cli.invoke(args=["users", "delete", "carol", "--yes"])
    assert r.exit_code == 0
    with database.session() as s:
        assert s.scalars(select(User)).one().is_active is False


def test_user_errors_are_clear(cli):
    r = cli.invoke(args=["users", "create", "dave", "--password", "short"])
    assert r.exit_code != 0 and "at least 8" in r.output
    r = cli.invoke(args=["users", "set-quota", "nobody", "3"])
    assert r.exit_code != 0 and "no user" in r.output


def test_bootstrap_creates_one_user_once(cli, database):
    r = cli.invoke(args=["bootstrap"])
    assert r.exit_code == 0 and "password" in r.output
    r = cli.invoke(args=["bootstrap"])
    assert "nothing to do" in r.output
    with database.session() as s:
        assert len(s.scalars(select(User)).all()) == 1


def test_console_script_runs_migrations(tmp_path):
    url = f"sqlite:///{tmp_path / 'fresh.sqlite3'}"
    env = {**os.environ, "DATABASE_URL": url}
    exe = os.path.join(os.path.dirname(sys.executable), "model-api")
    out = subprocess.run([exe, "db", "upgrade"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    out = subprocess.run([exe, "db", "current"], env=env, capture_output=True, text=True, timeout=120)
    from alembic.script import ScriptDirectory

    from model_api.migrate import alembic_config

    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    assert out.stdout.strip().splitlines()[-1] == head
