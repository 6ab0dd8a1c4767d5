"""gunicorn settings, read from the same environment as the app.

    gunicorn -c python:model_api.gunicorn_conf model_api.wsgi:app

One process with threads is the default on purpose: every process loads its
own copy of the model and llama.cpp already uses all cores for one decode,
so more processes only add memory and contention. Threads let many clients
wait for the model (and poll job status) at once.

| Env var | Default | Meaning |
|---|---|---|
| `BIND` | `$WEB_HOST:$PORT` | listen address |
| `WEB_HOST` | `127.0.0.1` | interface when BIND is unset; the image sets `0.0.0.0` |
| `PORT` | `5000` | port when BIND is unset |
| `WEB_WORKERS` | `1` | processes (each loads the model) |
| `WEB_THREADS` | `16` | request threads per process |
| `WEB_MIN_TOKENS_PER_SECOND` | `4` | slowest decode speed we plan for |
| `WEB_TIMEOUT` | longest generation + 60 s | worker silence before the arbiter restarts it |
| `WEB_GRACEFUL_TIMEOUT` | longest generation + 30 s | how long SIGTERM waits for in-flight calls |
| `WEB_CONTROL_SOCKET` | (off) | path of gunicorn's control socket, if wanted |
| `PROMETHEUS_MULTIPROC_DIR` | a temp dir when `WEB_WORKERS` > 1 | where worker processes share metrics (emptied at start) |
| `LOG_FORMAT` | `json` | `json` puts gunicorn's own lines in the app's JSON shape |

The longest generation is ``MAX_TOKENS_CAP / WEB_MIN_TOKENS_PER_SECOND``
(1024 / 4 = 256 s by default), so raising the cap raises both timeouts.
"""

from __future__ import annotations

import math
import os

from gunicorn import glogging

from model_api.listen import bind_from_env
from model_api.settings import Settings


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


def longest_generation_seconds() -> int:
    """Seconds the slowest allowed generation may take (MAX_TOKENS_CAP at the slowest planned speed)."""
    cap = _int_env("MAX_TOKENS_CAP", Settings.model_fields["max_tokens_cap"].default)
    speed = float(os.environ.get("WEB_MIN_TOKENS_PER_SECOND", "4") or 4)
    return math.ceil(cap / speed)


# 127.0.0.1 unless told otherwise: a development server is not for the network.
# The image sets WEB_HOST=0.0.0.0 (model_api/listen.py).
bind = bind_from_env()
workers = _int_env("WEB_WORKERS", 1)
threads = _int_env("WEB_THREADS", 16)
worker_class = "model_api.http_worker.HeldKeepAliveWorker"  # gthread, hand-offs spared: http_worker.py
# gthread heartbeats from its event loop, so this mainly catches a wedged
# process; it is still kept above the slowest generation so that a long call
# can never be the reason a worker is killed.
timeout = _int_env("WEB_TIMEOUT", longest_generation_seconds() + 60)
# SIGTERM: stop accepting, let in-flight calls (up to the longest generation)
# finish, then exit. Docker's stop_grace_period must be longer than this.
graceful_timeout = _int_env("WEB_GRACEFUL_TIMEOUT", longest_generation_seconds() + 30)
keepalive = 5
# gunicorn's runtime control socket (for gunicornc) defaults to one path per
# user ($HOME/.gunicorn/gunicorn.ctl): servers sharing a host or a user would
# fight over it, and the image's unprivileged user has no writable home. We do
# not use it, so it is off unless WEB_CONTROL_SOCKET names a path.
_control_socket = os.environ.get("WEB_CONTROL_SOCKET", "").strip()
if _control_socket:
    control_socket = _control_socket
control_socket_disable = not _control_socket
accesslog = None  # the app logs one structured line per request itself
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()


def worker_exit(server, worker) -> None:
    """After in-flight requests are done, let the in-process job threads finish
    their current and queued jobs too (the arbiter still kills us at
    graceful_timeout; jobs cut off there are recovered at the next start)."""
    app = getattr(worker, "wsgi", None)
    runtime = getattr(app, "extensions", {}).get("model_api") if app is not None else None
    if runtime is not None:
        runtime.close(wait=True)


# --- metrics across worker processes -------------------------------------------------
# prometheus_client aggregates several processes through files in
# PROMETHEUS_MULTIPROC_DIR; the variable must be set before any worker imports it,
# i.e. here. With more than one worker and no directory given we make one (the
# same helper as the Celery worker's, which remembers what it made so that
# on_exit removes that and never a directory someone gave us).
if workers > 1:
    from model_api.observability import multiproc

    multiproc.ensure_dir("model-api-metrics-")


def on_starting(server):
    """Empty the metrics directory: files left by an earlier run would be added in."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(path):
            if name.endswith(".db"):
                os.remove(os.path.join(path, name))


def on_exit(server):
    """Remove the metrics directory if this config made it."""
    from model_api.observability import multiproc

    multiproc.remove_made_dir()


def child_exit(server, worker):
    """Drop the dead worker's live gauges (its counters stay in the totals)."""
    from model_api.observability import metrics

    metrics.mark_process_dead(worker.pid)


class AppLogger(glogging.Logger):
    """gunicorn's own lines (start-up, worker boots, timeouts), in the app's JSON
    shape unless LOG_FORMAT=text, and no access log: the app writes one line per
    request itself (api/observability.py). Not a ``logconfig_dict``: given any
    logging config, gunicorn builds its access line's fields for every request
    even with nowhere to write them, and that ran before the reply's last
    segment could leave (api/wire.py)."""

    def setup(self, cfg) -> None:
        super().setup(cfg)
        if os.environ.get("LOG_FORMAT", "json").lower() == "json":
            from model_api.observability.logs import json_formatter

            for handler in self.error_log.handlers:
                handler.setFormatter(json_formatter())

    def access(self, resp, req, environ, request_time) -> None:
        return None


logger_class = AppLogger
