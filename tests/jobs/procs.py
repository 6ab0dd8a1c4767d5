"""Real processes for the job tests: an API server (gunicorn), Celery workers and
a private redis-server, each started as a subprocess and stopped by the test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import requests

from ..conftest import free_port, wait_for

SRC = str(Path(__file__).resolve().parents[2] / "src")


def env_for(db_url: str, **settings: object) -> dict[str, str]:
    """The environment of a server/worker subprocess: ours plus these settings."""
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("CELERY_BROKER_URL", None)
    env.update(
        DATABASE_URL=db_url,
        ENV="test",
        MODEL_N_THREADS="1",  # several model processes share 2 cores
        CANCEL_POLL_SECONDS="0.2",
        LOG_LEVEL="INFO",
    )
    env.update({k.upper(): str(v) for k, v in settings.items() if v is not None})
    return env


class Proc:
    """A subprocess in its own session (so a kill reaches its children too)."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path):
        self.log_path = log
        self._log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.p = subprocess.Popen(args, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        return self.p.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def send(self, sig: int) -> None:
        if self.alive():
            os.killpg(self.p.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> None:
        """Signal the main process only, as a service manager does: a Celery worker
        then shuts its pool down itself (warm shutdown on SIGTERM)."""
        if self.alive():
            self.p.send_signal(sig)
        try:
            self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.send(signal.SIGKILL)
            self.p.wait(10)
        self._log.close()

    def kill9(self) -> None:
        """SIGKILL the whole process group (the worker and its pool children) at once."""
        self.send(signal.SIGKILL)
        self.p.wait(10)


class ApiServer(Proc):
    def __init__(self, env: dict[str, str], log: Path):
        self.port = free_port()
        env = dict(env, PORT=str(self.port), BIND=f"127.0.0.1:{self.port}", WEB_THREADS="8")
        super().__init__([sys.executable, "-m", "gunicorn", "-c", "python:model_api.gunicorn_conf",
                          "model_api.wsgi:app"], env, log)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> None:
        def ready():
            assert self.alive(), self.log()
            try:
                return requests.get(self.url + "/ready", timeout=5).status_code == 200
            except requests.ConnectionError:
                return False

        wait_for(ready, timeout=180, interval=0.3, what="API server /ready")


class Worker(Proc):
    def __init__(self, env: dict[str, str], log: Path, name: str, *, via_cli: bool = False):
        if via_cli:  # the documented `model-api worker`
            args = [sys.executable, "-c", "from model_api.entry import main; main()", "worker",
                    "-c", "1", "-n", f"{name}@%h"]
        else:  # the documented `celery -A model_api.worker worker` equivalent
            args = [sys.executable, "-m", "celery", "-A", "model_api.worker", "worker",
                    "-Q", env["CELERY_QUEUE"], "-c", "1", "-n", f"{name}@%h", "-l", "INFO"]
        super().__init__(args, env, log)

    def wait_ready(self) -> None:
        def ready():
            assert self.alive(), self.log()
            return " ready." in self.log()

        wait_for(ready, timeout=120, interval=0.3, what="Celery worker ready")


class RedisServer(Proc):
    """A private, non-persistent redis-server (never the shared one) we may restart."""

    def __init__(self, log: Path, port: int | None = None):
        self.port = port or free_port()
        super().__init__(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no", "--daemonize", "no"], dict(os.environ), log)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        wait_for(self._pong, timeout=30, interval=0.1, what="redis-server")

    def _pong(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=self.port, socket_timeout=1).ping())
        except redis.ConnectionError:
            return False


def wait_all_final(base: str, headers: dict[str, str], job_ids: list[str], timeout: float = 600) -> dict[str, dict]:
    """Poll /async_call_status until every job is final; returns the last replies."""
    last: dict[str, dict] = {}

    def done() -> bool:
        for j in job_ids:
            if last.get(j, {}).get("state") in ("completed", "failed", "cancelled"):
                continue
            r = requests.get(base + "/async_call_status", params={"job_id": j}, headers=headers, timeout=10)
            assert r.status_code == 200, r.text
            last[j] = r.json()
            if last[j]["state"] not in ("completed", "failed", "cancelled"):
                return False
        return True

    wait_for(done, timeout=timeout, interval=0.5, what="all jobs final")
    return last

