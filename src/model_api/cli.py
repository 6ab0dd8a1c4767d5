"""The commands of ``model-api`` (the group itself is in :mod:`model_api.entry`):
user, key and database management, the first user, the Celery worker.

    model-api users create NAME [--password-stdin | --password PW] [--quota N] [--admin]
    model-api users set-admin NAME --on | --off
    model-api users set-quota NAME N | set-password NAME | list | delete NAME [--yes]
    model-api users set-models NAME MODEL... | --all
    model-api users webhook-secret NAME [--rotate]
    model-api users set-limits NAME [--rpm N] [--tpm N] [--concurrency N] [--token-budget N] [--clear LIMIT]
                                   [--reset-tokens]
    model-api keys create NAME [--name LABEL] [--models M1,M2] [--rpm N ... --priority N]
    model-api keys list [NAME] | revoke ID_OR_PREFIX
    model-api db upgrade | current
    model-api usage [--by user|key|model|day] [--since DATE] [--until DATE] [--csv]
    model-api bootstrap            # first user (an admin) for `make run`
    model-api worker [-c N]        # Celery worker for async jobs (CELERY_BROKER_URL)

A database that is missing, unreachable or not migrated is one sentence saying
what to do, never a traceback (and a missing SQLite file is never created as a
side effect of asking).
"""

from __future__ import annotations

import os
import sys
from datetime import UTC
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
from flask import current_app
from flask.cli import with_appcontext
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.orm import Session

from .models import ApiKey, Call, User
from .services import access, api_keys, limits
from .services import admin as admin_service
from .services import usage as usage_service
from .services import auth as auth_service
from .services import quota as quota_service
from .services.auth import UserError


def _rt():
    return current_app.extensions["model_api"]


def _where(url: str) -> str:
    """The database a URL names, without its password."""
    u = make_url(url)
    if u.drivername.startswith("sqlite"):
        return f"the SQLite file {u.database}"
    return f"{u.database or '(default)'} on {u.host or 'localhost'}:{u.port or 5432} as {u.username or '(default)'}"


def _connection_hint(url: str, exc: BaseException) -> str:
    """One sentence for a database we cannot use, with what to do about it."""
    msg = str(getattr(exc, "orig", None) or exc).strip()
    # psycopg: 'connection failed: connection to server at "...", port 5432 failed: FATAL:  role "x" ...'
    reason = msg.rsplit("FATAL:", 1)[-1].strip().splitlines()[0] if msg else type(exc).__name__
    u = make_url(url)
    if "role" in reason and "does not exist" in reason:
        todo = (f"create it (e.g. `createuser -h {u.host or 'localhost'} -U postgres --pwprompt {u.username}`) "
                "or set DATABASE_URL to an existing role")
    elif "database" in reason and "does not exist" in reason:
        todo = (f"create it (e.g. `createdb -h {u.host or 'localhost'} -U postgres -O {u.username} {u.database}`) "
                "or set DATABASE_URL to an existing database")
    elif "password authentication failed" in reason:
        todo = "check the password in DATABASE_URL"
    elif "refused" in reason or "could not translate host name" in reason or "timeout" in reason:
        todo = "is the database server running there? (or set DATABASE_URL)"
    else:
        todo = "check DATABASE_URL"
    return f"cannot use the database {_where(url)}: {reason}; {todo}"


@contextmanager
def _database_errors(url: str) -> Iterator[None]:
    try:
        yield
    except OperationalError as exc:
        if "no such table" in str(exc) or ("relation" in str(exc) and "does not exist" in str(exc)):
            raise click.ClickException(_not_migrated(url)) from None
        raise click.ClickException(_connection_hint(url, exc)) from None
    except ProgrammingError as exc:
        if "relation" in str(exc) and "does not exist" in str(exc):
            raise click.ClickException(_not_migrated(url)) from None
        raise


def _not_migrated(url: str) -> str:
    return (f"{_where(url)} has no tables yet: run `model-api db upgrade` (or `make migrate`) first, "
            "or set DATABASE_URL to the database you meant")


def _sqlite_path(url: str) -> Path | None:
    u = make_url(url)
    if u.drivername.startswith("sqlite") and u.database and u.database != ":memory:":
        return Path(u.database)
    return None


def require_schema() -> None:
    """Refuse, in one sentence, a database that is missing, unreachable or not migrated."""
    from .migrate import current

    url = _rt().settings.sqlalchemy_url
    path = _sqlite_path(url)
    if path is not None and not path.exists():
        raise click.ClickException(
            f"there is no database at {path}: create it with `model-api db upgrade` (or `make migrate`), "
            "or set DATABASE_URL (or INSTANCE_DIR) to the one you meant")
    with _database_errors(url):
        revision = current(url)
    if revision is None:
        raise click.ClickException(_not_migrated(url))


@contextmanager
def _session() -> Iterator[Session]:
    """A committed session on a migrated database; a refused user operation
    becomes a clean CLI error."""
    require_schema()
    try:
        with _database_errors(_rt().settings.sqlalchemy_url), _rt().db.session() as s:
            yield s
    except UserError as exc:
        raise click.ClickException(str(exc)) from None


def _read_password(password: str | None, from_stdin: bool) -> str:
    if password and from_stdin:
        raise click.UsageError("give --password or --password-stdin, not both")
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if password:
        return password
    return click.prompt("Password", hide_input=True, confirmation_prompt=True)


users = click.Group("users", help="Manage API users.")


@users.command("create")
@click.argument("name")
@click.option("--password", help="Password (visible in shell history: prefer --password-stdin).")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@click.option("--quota", type=click.IntRange(min=0), help="Model calls allowed (default: DEFAULT_QUOTA).")
@click.option("--admin", is_flag=True, help="An operator: may use /admin and the console's operator pages.")
@with_appcontext
def users_create(name: str, password: str | None, password_stdin: bool, quota: int | None, admin: bool) -> None:
    """Create a user (a customer, or with --admin an operator)."""
    pw = _read_password(password, password_stdin)
    with _session() as s:
        admin_service.create_user(s, admin_service.CLI, name, pw, quota, admin)
    click.echo(f"created {'admin' if admin else 'user'} {name}")


@users.command("set-admin")
@click.argument("name")
@click.option("--on/--off", "on", required=True, help="Make the user an admin, or a customer again.")
@with_appcontext
def users_set_admin(name: str, on: bool) -> None:
    """Make a user an admin (--on) or a customer (--off)."""
    with _session() as s:
        admin_service.update_user(s, admin_service.CLI, name, admin=on)
    click.echo(f"{name} is {'an admin' if on else 'a customer'}")


@users.command("set-quota")
@click.argument("name")
@click.argument("quota", type=click.IntRange(min=0))
@click.option("--reset-usage", is_flag=True, help="Also set the calls used so far back to 0.")
@with_appcontext
def users_set_quota(name: str, quota: int, reset_usage: bool) -> None:
    """Set a user's quota."""
    with _session() as s:
        quota_service.set_quota(s, auth_service.get_user(s, name), quota, reset_usage)
    click.echo(f"quota of {name} is now {quota}")


@users.command("set-password")
@click.argument("name")
@click.option("--password", help="New password.")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@with_appcontext
def users_set_password(name: str, password: str | None, password_stdin: bool) -> None:
    """Change a user's password (cached credentials stop working at once)."""
    pw = _read_password(password, password_stdin)
    with _session() as s:
        auth_service.set_password(s, name, pw)
    click.echo(f"password of {name} changed")


@users.command("list")
@with_appcontext
def users_list() -> None:
    """List users with their quota and usage."""
    rt = _rt()
    with _session() as s:
        rows = s.execute(
            select(User, func.count(Call.id)).outerjoin(Call).group_by(User.id).order_by(User.username)
        ).all()
        click.echo(f"{'username':<24} {'active':<6} {'quota':>6} {'used':>6} {'left':>6} {'calls':>6} models")
        for user, ncalls in rows:
            st = quota_service.state_of_user(user, rt.policy.default_quota, rt.policy.window_seconds)
            click.echo(
                f"{user.username:<24} {'yes' if user.is_active else 'no':<6} {st.limit:>6} "
                f"{st.limit - st.remaining:>6} {st.remaining:>6} {ncalls:>6} "
                f"{'all' if user.allowed_models is None else ','.join(user.allowed_models) or '-'}"
            )


@users.command("delete")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@with_appcontext
def users_delete(name: str, yes: bool) -> None:
    """Deactivate a user: they can no longer sign in; their calls are kept."""
    if not yes:
        click.confirm(f"deactivate {name}?", abort=True)
    with _session() as s:
        user = auth_service.get_user(s, name)
        user.is_active = False
        # free the name for reuse while keeping history attached to the old row
        user.username = f"{user.username}#deleted-{user.id}"
    click.echo(f"deleted user {name} (calls kept)")


@users.command("webhook-secret")
@click.argument("name")
@click.option("--rotate", is_flag=True, help="Replace it with a new secret (the old one stops verifying at once).")
@with_appcontext
def users_webhook_secret(name: str, rotate: bool) -> None:
    """Print the secret a user's job-end webhooks are signed with (made on first use)."""
    with _session() as s:
        user_id = auth_service.get_user(s, name).id
    click.echo(_rt().webhooks.secret_of(user_id, rotate=rotate))


def _model_ids(names: tuple[str, ...]) -> list[str]:
    """The served ids for model names typed on the command line (ids or aliases)."""
    return access.canonical_ids(names, _rt().models.names)


@users.command("set-models")
@click.argument("name")
@click.argument("models", nargs=-1)
@click.option("--all", "all_models", is_flag=True, help="Allow every model (remove the limit).")
@with_appcontext
def users_set_models(name: str, models: tuple[str, ...], all_models: bool) -> None:
    """Limit a user to these model ids (or aliases); --all lifts the limit."""
    if all_models == bool(models):
        raise click.UsageError("give model ids, or --all")
    with _session() as s:
        ids = None if all_models else _model_ids(models)
        access.set_user_models(auth_service.get_user(s, name), ids)
    click.echo(f"{name} may use {'every model' if ids is None else ', '.join(sorted(set(ids)))}")


def _limit_options(fn):
    """--rpm, --tpm, --concurrency and --token-budget (README "Limits")."""
    for name, help_ in reversed((
        ("rpm", "Model calls per LIMITS_WINDOW_SECONDS (a minute)."),
        ("tpm", "Tokens (prompt + completion) per LIMITS_WINDOW_SECONDS."),
        ("concurrency", "Sync and streamed calls in flight at once."),
    )):
        fn = click.option(f"--{name}", type=click.IntRange(min=1), help=help_)(fn)
    return click.option("--token-budget", type=click.IntRange(min=0),
                        help="Tokens allowed in total (prompt + completion).")(fn)


def _describe(row, default: limits.Caps | None = None) -> str:
    """A user's (``default``: the settings') or a key's limits, one line."""
    parts = []
    for name, column in limits.LIMIT_FIELDS.items():
        value = getattr(row, column)
        if value is not None:
            shown = str(value)
        elif default is None:  # a key without its own: its user's apply
            shown = "user's"
        else:
            fallback = getattr(default, name)
            shown = "unlimited" if fallback is None else f"{fallback} (default)"
        parts.append(f"{name.replace('_', '-')}={shown}")
    return ", ".join(parts) + f"; tokens used {row.tokens_used}"


@users.command("set-limits")
@click.argument("name")
@_limit_options
@click.option("--clear", "clear", multiple=True, type=click.Choice(["rpm", "tpm", "concurrency", "token-budget"]),
              help="Back to the setting's default (repeatable).")
@click.option("--reset-tokens", is_flag=True, help="Set the tokens used so far (against the budget) back to 0.")
@with_appcontext
def users_set_limits(name: str, rpm: int | None, tpm: int | None, concurrency: int | None,
                     token_budget: int | None, clear: tuple[str, ...], reset_tokens: bool) -> None:
    """Set a user's request, token and concurrency limits and token budget."""
    s_ = _rt().settings
    default = limits.Caps(s_.default_rpm, s_.default_tpm, s_.default_concurrency, s_.default_token_budget)
    with _session() as s:
        user = auth_service.get_user(s, name)
        limits.set_limits(user, rpm=rpm, tpm=tpm, concurrency=concurrency, token_budget=token_budget,
                          clear=tuple(c.replace("-", "_") for c in clear), reset_tokens=reset_tokens)
        s.flush()
        click.echo(f"limits of {name}: {_describe(user, default)}")


keys = click.Group("keys", help="Manage API keys (Authorization: Bearer).")


@keys.command("create")
@click.argument("username")
@click.option("--name", "label", help="A label to tell keys apart (e.g. the app using it).")
@click.option("--models", "models", multiple=True,
              help="Limit the key to these model ids (repeat, or comma-separated), within its user's.")
@_limit_options
@click.option("--priority", type=click.IntRange(min=1, max=100),
              help="Weight in the engine's fair scheduler: turns per round against other users' 1 (default 1).")
@with_appcontext
def keys_create(username: str, label: str | None, models: tuple[str, ...], rpm: int | None, tpm: int | None,
                concurrency: int | None, token_budget: int | None, priority: int | None) -> None:
    """Create an API key for a user and print it (this is the only time it is shown).
    Its limits apply within its user's."""
    names = tuple(n.strip() for m in models for n in m.split(",") if n.strip())
    with _session() as s:
        ids = _model_ids(names) if models else None
        new = api_keys.create_key(s, auth_service.get_user(s, username), label, ids)
        row = s.get(ApiKey, new.id)
        limits.set_limits(row, rpm=rpm, tpm=tpm, concurrency=concurrency, token_budget=token_budget)
        row.priority = priority
    click.echo(new.key)
    click.echo(f"created key {new.id} ({new.prefix}...) for {username}; store it now, it is not shown again",
               err=True)


@keys.command("list")
@click.argument("username", required=False)
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked keys.")
@with_appcontext
def keys_list(username: str | None, include_revoked: bool) -> None:
    """List keys (of one user or everyone's): id, prefix, owner, label, dates."""
    with _session() as s:
        user = auth_service.get_user(s, username) if username else None
        rows = api_keys.list_keys(s, user, include_revoked)
        click.echo(f"{'id':>5} {'prefix':<12} {'user':<20} {'name':<20} {'created':<20} "
                   f"{'last used':<20} {'revoked':<20} models")
        for k in rows:
            def fmt(d):
                return d.strftime("%Y-%m-%d %H:%M") if d else "-"

            click.echo(f"{k.id:>5} {k.prefix:<12} {k.user.username:<20} {(k.name or '-'):<20} "
                       f"{fmt(k.created_at):<20} {fmt(k.last_used_at):<20} {fmt(k.revoked_at):<20} "
                       f"{'user' if k.allowed_models is None else ','.join(k.allowed_models) or '-'}")


@keys.command("revoke")
@click.argument("key")
@with_appcontext
def keys_revoke(key: str) -> None:
    """Revoke a key by its id or listed prefix; it stops working at once."""
    with _session() as s:
        row = api_keys.revoke_key(s, key)
        click.echo(f"revoked key {row.id} ({row.prefix}...) of {row.user.username}")


@click.command("usage")
@click.option("--by", "group_by", type=click.Choice(usage_service.GROUPS), default="user", show_default=True)
@click.option("--since", type=click.DateTime(["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"]), help="From this UTC date, inclusive.")
@click.option("--until", type=click.DateTime(["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"]), help="Up to this UTC date, exclusive.")
@click.option("--csv", "as_csv", is_flag=True, help="CSV (for billing) instead of a table.")
@with_appcontext
def usage_command(group_by: str, since, until, as_csv: bool) -> None:
    """The usage report of GET /admin/usage: calls, outcomes, tokens, model time per group."""
    since = since.replace(tzinfo=UTC) if since else None
    until = until.replace(tzinfo=UTC) if until else None
    require_schema()
    with _database_errors(_rt().settings.sqlalchemy_url):
        usage_service.roll_up(_rt().db, max_days=10_000)  # whatever days closed since the last roll-up
    with _session() as s:
        rows = usage_service.report(s, group_by, since, until)
    if as_csv:
        click.echo(usage_service.to_csv(rows, group_by), nl=False)
        return
    click.echo(f"{group_by:<32} {'calls':>8} {'done':>8} {'failed':>7} {'refund':>7} "
               f"{'prompt_tok':>11} {'compl_tok':>10} {'model_s':>9}")
    for r in [*rows, None]:
        if r is None:
            t = usage_service.totals(rows)
            label, r = "TOTAL", usage_service.UsageRow(None, "TOTAL", **t)  # type: ignore[arg-type]
        else:
            label = r.label
        click.echo(f"{label[:32]:<32} {r.calls:>8} {r.completed:>8} {r.failed:>7} {r.refunded:>7} "
                   f"{r.prompt_tokens:>11} {r.completion_tokens:>10} {r.model_seconds:>9.1f}")


db_group = click.Group("db", help="Database schema.")


@db_group.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@with_appcontext
def db_upgrade(revision: str) -> None:
    """Apply migrations."""
    from .migrate import upgrade

    url = _rt().settings.sqlalchemy_url
    with _database_errors(url):
        upgrade(url, revision)
    click.echo("database is up to date")


@db_group.command("current")
@with_appcontext
def db_current() -> None:
    """Show the applied migration."""
    from .migrate import current

    url = _rt().settings.sqlalchemy_url
    path = _sqlite_path(url)
    if path is not None and not path.exists():
        click.echo(f"(none: no database at {path})")
        return
    with _database_errors(url):
        click.echo(current(url) or "(none)")


@click.command("bootstrap")
@with_appcontext
def bootstrap() -> None:
    """Create the first user when there is none, printing its credentials once.

    Its name is ADMIN_USERNAME (default `demo`), its password ADMIN_PASSWORD
    (random when unset: shown this once), its quota ADMIN_QUOTA (default 100,
    enough for the README's examples; customers get DEFAULT_QUOTA).
    """
    result = create_first_user(_rt())
    if result is None:
        click.echo("users exist; nothing to do")
        return
    name, pw, generated = result
    click.echo(f"created user {name!r} with quota {_rt().settings.admin_quota}"
               + (f" and password {pw!r} (shown once)" if generated else ""))


def create_first_user(rt) -> tuple[str, str, bool] | None:
    """(name, password, generated) of the user made now; None when users exist."""
    settings = rt.settings
    with _session() as s:
        if s.scalar(select(func.count(User.id))):
            return None
        name = settings.admin_username or "demo"
        pw, generated = ((settings.admin_password, False) if settings.admin_password
                         else (auth_service.generate_password(), True))
        # the first user runs the service: an admin (the console's operator pages, /admin)
        admin_service.create_user(s, admin_service.CLI, name, pw, settings.admin_quota, admin=True)
    return name, pw, generated


@click.command(
    "worker",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
)
@click.option("--concurrency", "-c", type=click.IntRange(min=1), default=1, show_default=True,
              help="Jobs run at once by this worker (one model copy per process).")
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@click.pass_context
def worker(ctx: click.Context, concurrency: int, loglevel: str) -> None:
    """Start a Celery worker running async jobs (needs CELERY_BROKER_URL).

    Same as ``celery -A model_api.worker worker -Q $CELERY_QUEUE -c N``; any
    further options (e.g. ``-n w1@%h``) are passed to Celery. Start one per
    machine (or more) against the same broker and database to scale out.
    """
    from .settings import Settings

    settings = Settings()
    if not settings.celery_broker_url:
        raise click.UsageError("CELERY_BROKER_URL is not set")
    celery_args = ["worker", "-Q", settings.celery_queue, "-c", str(concurrency), "-l", loglevel, *ctx.args]
    # A fresh interpreter (same pid): this CLI has built a web app and imported
    # prometheus_client in single-process mode, while a worker's pool processes
    # can only report to its metrics port if the mode is chosen before that
    # import; and the worker's wiring (model_api.worker) stays out of the CLI.
    os.execv(sys.executable, [sys.executable, "-m", "celery", "-A", "model_api.worker", *celery_args])


def register_commands(app) -> None:
    app.cli.add_command(users)
    app.cli.add_command(keys)
    app.cli.add_command(db_group)
    app.cli.add_command(bootstrap)
    app.cli.add_command(usage_command)
    app.cli.add_command(worker)
