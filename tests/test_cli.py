"""The model-api console command, through Click's runner and as a real subprocess."""

import os
import subprocess
import sys
from pathlib import Path

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


# --- the console script from anywhere ------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None, stdin: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    """`model-api ARGS` as a user would run it: a fresh process, in `cwd`, with this checkout's code."""
    base = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "INSTANCE_DIR")}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "model_api.entry", *args], cwd=cwd, env={**base, **(env or {})},
                          input=stdin, capture_output=True, text=True, timeout=timeout)


def one_sentence(r: subprocess.CompletedProcess) -> str:
    """The error a command printed: exactly one line on stderr, no traceback."""
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("Error: ")
    return lines[0]


def test_default_database_is_anchored_to_the_project_not_the_working_directory(tmp_path):
    probe = "from model_api.settings import Settings; print(Settings().database_url)"
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "INSTANCE_DIR")}
    env["PYTHONPATH"] = str(ROOT / "src")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.strip() == f"sqlite:///{ROOT / 'instance' / 'model_api.sqlite3'}"
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={**env, "INSTANCE_DIR": "/srv/x"},
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "sqlite:////srv/x/model_api.sqlite3"


def test_cli_from_another_directory_never_creates_a_database_there(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    instance = tmp_path / "instance"
    env = {"INSTANCE_DIR": str(instance)}
    db_file = instance / "model_api.sqlite3"

    msg = one_sentence(run_cli("users", "list", cwd=elsewhere, env=env))
    assert f"there is no database at {db_file}" in msg and "model-api db upgrade" in msg
    assert not db_file.exists() and list(elsewhere.iterdir()) == []

    r = run_cli("db", "upgrade", cwd=elsewhere, env=env)
    assert r.returncode == 0, r.stderr
    assert db_file.is_file() and list(elsewhere.iterdir()) == []
    r = run_cli("users", "create", "erin", "--password-stdin", cwd=elsewhere, env=env, stdin="a long password\n")
    assert r.returncode == 0, r.stderr
    r = run_cli("users", "list", cwd=tmp_path, env=env)  # yet another directory, same database
    assert r.returncode == 0 and "erin" in r.stdout


def test_an_unmigrated_database_is_one_sentence(tmp_path):
    empty = tmp_path / "empty.sqlite3"
    empty.touch()
    msg = one_sentence(run_cli("users", "list", cwd=tmp_path, env={"DATABASE_URL": f"sqlite:///{empty}"}))
    assert "has no tables yet" in msg and "model-api db upgrade" in msg


def test_a_missing_postgresql_role_is_one_sentence_saying_what_to_create(tmp_path, db_url):
    from urllib.parse import urlparse

    from .conftest import need, port_open

    need(db_url.startswith("postgresql"), "needs PostgreSQL (set DATABASE_URL)")
    u = urlparse(db_url.replace("+psycopg", ""))
    url = f"postgresql://no_such_role_h18:pw@{u.hostname}:{u.port or 5432}/no_such_db"
    need(port_open(u.hostname, u.port or 5432), "PostgreSQL not reachable")
    msg = one_sentence(run_cli("db", "upgrade", cwd=tmp_path, env={"DATABASE_URL": url}))
    assert 'role "no_such_role_h18" does not exist' in msg, msg
    assert "createuser" in msg and "DATABASE_URL" in msg
    assert ":pw@" not in msg and "pw" not in msg.split("does not exist")[0]  # never the password


def test_help_is_readable_version_is_ours_and_delete_documents_yes(tmp_path):
    r = run_cli("--help", cwd=tmp_path)
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    # the command summary keeps its lines (click would rewrap it into one paragraph)
    assert any(line.strip().startswith("model-api users delete NAME [--yes]") for line in lines), r.stdout
    assert any(line.strip().startswith("model-api db upgrade") for line in lines)
    r = run_cli("--version", cwd=tmp_path)
    from importlib.metadata import version

    assert r.returncode == 0 and r.stdout.startswith(f"model-api {version('model-api')} (Python 3."), r.stdout
    assert "Flask" not in r.stdout and "Werkzeug" not in r.stdout
    r = run_cli("users", "delete", "--help", cwd=tmp_path)
    assert "--yes" in r.stdout
    readme_and_docs = "".join(p.read_text() for p in [ROOT / "README.md", *ROOT.glob("docs/*.md")])
    assert "users delete alice --yes" in readme_and_docs


def test_bin_shim_runs_the_project_cli_from_anywhere(tmp_path):
    from .conftest import need

    need((ROOT / ".venv" / "bin" / "model-api").exists(), "no .venv in this checkout (run make install)")
    r = subprocess.run([str(ROOT / "bin" / "model-api"), "--version"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("model-api "), r.stderr


def test_first_user_gets_admin_quota_and_customers_the_default(cli, database):
    r = cli.invoke(args=["bootstrap"])
    assert r.exit_code == 0 and "quota 100" in r.output, r.output
    r = cli.invoke(args=["users", "create", "frank", "--password-stdin"], input="a long password\n")
    assert r.exit_code == 0, r.output
    from model_api.models import User as U

    with database.session() as s:
        quotas = {u.username: u.quota for u in s.scalars(select(U))}
    assert quotas.pop("frank") in (None, 3)  # None: DEFAULT_QUOTA (3) applies
    assert list(quotas.values()) == [100]


def test_limits_of_users_and_keys_are_set_from_the_command_line(cli, database):
    from model_api.models import ApiKey

    cli.invoke(args=["users", "create", "gina", "--password", "a long password"])
    r = cli.invoke(args=["users", "set-limits", "gina", "--rpm", "60", "--tpm", "20000", "--concurrency", "4",
                         "--token-budget", "1000000"])
    assert r.exit_code == 0, r.output
    assert "rpm=60, tpm=20000, concurrency=4, token-budget=1000000" in r.output
    r = cli.invoke(args=["users", "set-limits", "gina", "--clear", "rpm", "--clear", "token-budget"])
    assert "rpm=unlimited" in r.output and "token-budget=unlimited" in r.output and "tpm=20000" in r.output
    r = cli.invoke(args=["keys", "create", "gina", "--rpm", "10", "--priority", "3"])
    assert r.exit_code == 0, r.output
    with database.session() as s:
        user = s.scalar(select(User).where(User.username == "gina"))
        key = s.scalar(select(ApiKey).where(ApiKey.user_id == user.id))
        assert (user.rpm_limit, user.tpm_limit, user.concurrency_limit, user.token_budget) == (None, 20000, 4, None)
        assert (key.rpm_limit, key.tpm_limit, key.priority) == (10, None, 3)


@pytest.mark.parametrize("args", [["--rpm", "0"], ["--token-budget", "-1"], ["--concurrency", "many"]])
def test_a_bad_limit_is_refused_naming_it(cli, args):
    cli.invoke(args=["users", "create", "hank", "--password", "a long password"])
    r = cli.invoke(args=["users", "set-limits", "hank", *args])
    assert r.exit_code == 2 and args[0] in r.output
