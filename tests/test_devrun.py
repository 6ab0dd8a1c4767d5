"""`make run`'s server process (src/model_api/devrun.py): a banner once ready, on
loopback only, with a first user whose credentials and curl line work as printed."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from model_api.devrun import FirstUser, banner

from .conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent: only picks the outgoing interface
            addr = s.getsockname()[0]
        except OSError:
            return None
    return None if addr.startswith("127.") else addr


def migrated_instance(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a new `make run` instance in ``tmp_path`` (its own SQLite file,
    none of this shell's server settings), its database migrated."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "BIND", "WEB_HOST", "ADMIN_USERNAME", "ADMIN_PASSWORD", "CELERY_BROKER_URL")}
    env.update(PYTHONPATH=str(ROOT / "src"), INSTANCE_DIR=str(tmp_path / "instance"), **extra)
    up = subprocess.run([sys.executable, "-m", "model_api.entry", "db", "upgrade"], env=env, cwd=tmp_path,
                        capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, up.stderr
    return env


@pytest.mark.model
@pytest.mark.slow
def test_make_run_prints_a_banner_with_working_credentials_and_binds_loopback(tmp_path):
    port = free_port()
    env = migrated_instance(tmp_path, PORT=str(port), MODEL_N_THREADS="1", WEB_THREADS="4", RUN_READY_TIMEOUT="180")
    proc = subprocess.Popen([sys.executable, "-m", "model_api.devrun"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr: list[str] = []
    threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True).start()
    try:
        out, rules = [], 0
        deadline = time.monotonic() + 240
        while rules < 2 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            out.append(line)
            rules += line.startswith("====")
        text = "".join(out)
        assert rules == 2, f"no banner:\n{text}\n{''.join(stderr)[-3000:]}"
        # the banner is on stdout, apart from the JSON log lines (stderr)
        assert not any(line.lstrip().startswith("{") for line in out)
        url = f"http://127.0.0.1:{port}"
        assert f"ready at {url}" in text and f"{url}/docs" in text
        name = re.search(r"first user:\s+(\S+)", text).group(1)
        password = re.search(r"password:\s+(\S+)", text).group(1)
        assert name == "demo" and "shown this once" in text
        assert "100 of 100 model calls left" in text
        curl = re.search(r"^\s*(curl .*)$", text, re.M).group(1)
        args = shlex.split(curl)
        assert args[args.index("-u") + 1] == f"{name}:{password}" and args[-1] == f"{url}/call_model"

        # the credentials work, with the first user's quota
        r = requests.post(args[-1], json={"prompt": "Hello, world!", "max_tokens": 4}, auth=(name, password),
                          timeout=120)
        assert r.status_code == 201, r.text
        assert r.headers["X-RateLimit-Limit"] == "100" and r.headers["X-RateLimit-Remaining"] == "99"

        # development listens on loopback only
        assert f"Listening at: http://127.0.0.1:{port}" in "".join(stderr)
        other = _non_loopback_address()
        if other is not None:
            with pytest.raises(OSError):
                socket.create_connection((other, port), timeout=2).close()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0


@pytest.mark.parametrize("admin_password, generated", [(None, True), ("chosen-by-the-operator", False)])
def test_the_first_user_password_counts_as_generated_only_without_admin_password(tmp_path, admin_password,
                                                                                  generated):
    env = migrated_instance(tmp_path, **({} if admin_password is None else {"ADMIN_PASSWORD": admin_password}))
    probe = "from model_api.devrun import first_user; u = first_user(); print(u.password, u.generated)"
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    password, said = out.stdout.split()[-2:]
    assert said == str(generated), out.stderr[-2000:]
    assert (password == admin_password) is not generated


@pytest.mark.parametrize("generated, says_generated", [(True, True), (False, False)])
def test_banner_calls_the_password_generated_only_when_it_was(generated, says_generated):
    """ADMIN_PASSWORD set: the operator chose it, and the banner must not claim otherwise."""
    text = banner("http://127.0.0.1:5000", FirstUser("demo", "pw-123", 100, 100, generated=generated))
    assert "password:    pw-123" in text
    assert "-u demo:pw-123" in text
    assert ("generated: shown this once" in text) is says_generated


def test_banner_of_a_later_run_says_where_the_password_went():
    text = banner("http://127.0.0.1:5000", FirstUser("demo", None, 100, 97, generated=False))
    assert "97 of 100 model calls left" in text
    assert "bin/model-api users set-password demo" in text
    assert "-u demo:PASSWORD" in text
    assert "shown this once" not in text
