"""``make run``: the first user, then gunicorn, then a banner once it is ready.

    python -m model_api.devrun

Runs ``model-api bootstrap`` in-process (so a password it generates can be
shown), starts gunicorn with the usual config (its JSON log lines go to
stderr as always), waits for ``/ready`` and prints a short banner on stdout
(the URL, ``/docs``, the first user's name, password and quota, one curl line
to paste), set apart from the log lines. Ctrl-C (or SIGTERM) stops gunicorn
gracefully. Development listens on 127.0.0.1 unless WEB_HOST or BIND say
otherwise (see gunicorn_conf.py).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass


@dataclass
class FirstUser:
    name: str
    password: str | None  # None: made by an earlier run, password not known here
    quota_limit: int
    quota_left: int
    generated: bool  # the password was made up now (no ADMIN_PASSWORD): said so, shown this once


def first_user() -> FirstUser | None:
    """Create the first user if there is none; describe the first user either way."""
    from sqlalchemy import select

    from .cli import create_first_user
    from .entry import _cli_app
    from .models import User
    from .services import quota as quota_service

    app = _cli_app()
    rt = app.extensions["model_api"]
    try:
        with app.app_context():
            made = create_first_user(rt)
            s_ = rt.settings
            name = made[0] if made else (s_.admin_username or "demo")
            with rt.db.session() as s:
                user = s.scalars(select(User).where(User.username == name)).one_or_none()
                if user is None:  # users exist, but not this one: show the oldest active
                    user = s.scalars(select(User).where(User.is_active.is_(True)).order_by(User.id)).first()
                if user is None:
                    return None
                st = quota_service.state_of_user(user, rt.policy.default_quota, rt.policy.window_seconds)
                password = made[1] if made else (s_.admin_password if user.username == s_.admin_username else None)
                return FirstUser(user.username, password, st.limit, st.remaining, generated=bool(made and made[2]))
    finally:
        rt.close()


def bind_address() -> tuple[str, int]:
    from .listen import bind_from_env

    host, _, port = bind_from_env().rpartition(":")
    return host.strip("[]"), int(port)


def banner(url: str, user: FirstUser | None) -> str:
    lines = [f"ML Model API is ready at {url}", f"  API docs (Swagger UI): {url}/docs",
             f"  web console and playground: {url}/console/"]
    if user is not None:
        if user.password is not None:
            pw_shown = user.password + ("   (generated: shown this once, note it now)" if user.generated else "")
            pw_curl = user.password
        else:
            pw_shown = f"(set at the first run; a new one: bin/model-api users set-password {user.name})"
            pw_curl = "PASSWORD"
        lines += [
            f"  first user:  {user.name}",
            f"  password:    {pw_shown}",
            f"  quota:       {user.quota_left} of {user.quota_limit} model calls left",
            "  try it:",
            f"    curl -s -u {shlex.quote(user.name + ':' + pw_curl)} -H 'Content-Type: application/json' "
            f"-d '{{\"prompt\": \"Hello, world!\"}}' {url}/call_model",
        ]
    lines.append("  stop: Ctrl-C    more: README.md, docs/")
    rule = "=" * min(max(len(line) for line in lines) + 2, 78)
    return "\n".join(["", rule, *lines, rule, ""])


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url + "/ready", timeout=3) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)  # each 503 while the model loads is an ERROR access-log line: poll gently
    return False


def main() -> int:
    import click

    try:
        user = first_user()
    except click.ClickException as exc:  # e.g. the database is not migrated: one sentence, no traceback
        print(f"Error: {exc.format_message()}", file=sys.stderr)
        return 1
    host, port = bind_address()
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
    url = f"http://{shown_host}:{port}"
    print(f"Starting the server on {host}:{port} (loading the model takes a few seconds) ...", flush=True)
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "python:model_api.gunicorn_conf",
                             "model_api.wsgi:app"])

    def forward(signum, _frame):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    if wait_ready(url, proc, float(os.environ.get("RUN_READY_TIMEOUT", "300"))):
        print(banner(url, user), flush=True)
    elif proc.poll() is None:
        print(f"\nThe server runs but {url}/ready is not 200 yet: see the log lines above.\n", flush=True)
    code = proc.wait()
    return 0 if code in (0, -signal.SIGTERM, -signal.SIGINT) else code


if __name__ == "__main__":
    sys.exit(main())
