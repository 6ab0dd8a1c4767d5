"""The Celery worker: ``celery -A model_api.worker worker -Q model_api.jobs -c 1``.

Everything only a worker process needs lives here, so a web process that
merely publishes job ids (``celery_app``) never connects a worker hook: a
runtime per pool process, the reconciler loop, JSON logs, the metrics port.

Reads the same environment as the server (CELERY_BROKER_URL, DATABASE_URL,
...). ``model-api worker`` does the same with the queue filled in. With
WORKER_METRICS_PORT set, the worker serves Prometheus metrics of itself and its
pool processes on that port (docs/operations.md, "Metrics").
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from .settings import Settings, get_settings

_settings = get_settings()
if _settings.worker_metrics_port:
    # the pool processes run the jobs; their numbers reach the parent's metrics
    # port through files, a mode prometheus_client fixes when it is first
    # imported, i.e. after this line and never before (see observability.multiproc)
    from .observability import multiproc

    multiproc.ensure_dir("model-api-worker-metrics-")

from celery import Celery, signals  # noqa: E402 - after the metrics directory, on purpose

from .celery_app import make_celery  # noqa: E402
from .runtime import Runtime  # noqa: E402
from .services.ledger import DATABASE_UNAVAILABLE  # noqa: E402

log = logging.getLogger(__name__)

# One Runtime per worker *process*: prefork children must not share the
# parent's database connections or model, so each builds its own after fork.
_RUNTIMES: dict[int, Runtime] = {}
_RUNTIMES_LOCK = threading.Lock()


def worker_runtime(settings: Settings) -> Runtime:
    pid = os.getpid()
    with _RUNTIMES_LOCK:
        rt = _RUNTIMES.get(pid)
        if rt is None:
            rt = Runtime(settings)
            _RUNTIMES[pid] = rt
        return rt


_STOP_RECONCILER: list[threading.Event] = []


@signals.worker_ready.connect
def _start_reconciler(sender: Any = None, **_: Any) -> None:
    """In the worker's main process: sweep at start-up, then every interval."""
    settings = getattr(sender.app.conf, "model_api_settings", None) if sender is not None else None
    if settings is None:
        return
    _STOP_RECONCILER.append(worker_runtime(settings).start_reconciler())
    # job-end webhooks are delivered from the outbox by the worker's main process
    worker_runtime(settings).webhooks.start()


@signals.worker_shutting_down.connect
def _stop_reconciler(**_: Any) -> None:
    while _STOP_RECONCILER:
        _STOP_RECONCILER.pop().set()


@signals.worker_process_init.connect
def _child_starts_clean(**_: Any) -> None:
    # a forked pool child must not reuse the parent's Runtime (sockets, threads)
    with _RUNTIMES_LOCK:
        _RUNTIMES.clear()


# --- worker observability ------------------------------------------------------
# The same JSON log lines as the web server (with the request_id and job_id that
# Jobs.run binds), and, with WORKER_METRICS_PORT, a /metrics port that adds
# up the parent and every pool process (their files in PROMETHEUS_MULTIPROC_DIR,
# which model_api.worker sets up before prometheus_client is imported).


@signals.setup_logging.connect
def _json_logs(loglevel: Any = None, **_: Any) -> None:
    """Replace Celery's log format with ours (connecting this signal tells Celery
    not to configure logging itself); the level is the worker's ``-l``."""
    from .observability.logs import configure_logging
    from .settings import get_settings

    level = logging.getLevelName(loglevel) if isinstance(loglevel, int) else (loglevel or "INFO")
    configure_logging(str(level), get_settings().log_format)


@signals.worker_ready.connect
def _serve_metrics(sender: Any = None, **_: Any) -> None:
    """In the worker's main process, once the pool runs (so pool processes do not
    inherit the listening socket) and logging is set up: start the metrics port."""
    app = getattr(sender, "app", None)
    settings = getattr(app.conf, "model_api_settings", None) if app is not None else None
    if settings is None or not settings.worker_metrics_port:
        return
    from .observability import metrics

    if not metrics.multiprocess_dir():
        log.warning("PROMETHEUS_MULTIPROC_DIR is not set: the metrics port shows the main process only "
                    "(start the worker with `model-api worker` or `celery -A model_api.worker`)")
    metrics.start_metrics_server(settings.worker_metrics_port, settings.worker_metrics_addr)
    log.info("serving metrics", extra={"port": settings.worker_metrics_port, "addr": settings.worker_metrics_addr,
                                       "multiprocess_dir": metrics.multiprocess_dir()})


@signals.worker_process_shutdown.connect
def _pool_process_exits(pid: int | None = None, **_: Any) -> None:
    """A pool process exits: drop its live gauges (its counters stay in the totals)."""
    from .observability import metrics

    metrics.mark_process_dead(pid or os.getpid())


@signals.worker_shutdown.connect
def _remove_metrics_dir(**_: Any) -> None:
    from .observability import multiproc

    multiproc.remove_made_dir()


def make_worker(settings: Settings) -> Celery:
    """A consuming Celery app: each job runs in its pool process's own runtime;
    a job the database was unavailable to start is retried by Celery (its row is
    still queued), not dropped."""
    return make_celery(settings, run_job=lambda job_id: worker_runtime(settings).jobs.run(job_id),
                       retry_on=DATABASE_UNAVAILABLE)


app = make_worker(_settings)
