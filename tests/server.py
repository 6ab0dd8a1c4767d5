"""A real gunicorn server process for tests that need real HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]


class LiveServer:
    def __init__(self, port: int, env: dict[str, str], workers: int = 1, threads: int = 8, log_path: Path | None = None):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.env = env
        self.workers = workers
        self.threads = threads
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> LiveServer:
        env = {**os.environ, **self.env}
        # make the worktree's src win over any installed copy
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
        env.update(BIND=f"127.0.0.1:{self.port}", WEB_WORKERS=str(self.workers), WEB_THREADS=str(self.threads))
        log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "python:model_api.gunicorn_conf", "model_api.wsgi:app"],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )
        deadline = time.monotonic() + timeout
        ready_hits = 0
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; log: {self.log_path}")
            try:
                r = requests.get(self.url + "/ready", timeout=2)
                # several workers answer in turn: wait until a run of answers says ready
                ready_hits = ready_hits + 1 if r.status_code == 200 else 0
                if ready_hits >= 2 * self.workers:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready within {timeout}s; log: {self.log_path}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
