"""Celery + Redis job queue: durable async jobs shared by workers on many machines.

The queue carries only job ids; PostgreSQL stays the source of truth for a
job's state and response (no result backend). A worker runs the very same
``Jobs.run(job_id)`` as the in-process executor, so the two cannot drift.

Kill-safety, and why each setting is there:

* ``task_acks_late``: a message is acknowledged after the job ran, so a worker
  killed mid-job leaves it unacknowledged (redelivered) instead of lost;
* ``task_reject_on_worker_lost``: a pool child killed mid-job puts its message
  back at once instead of acknowledging it as failed;
* ``worker_prefetch_multiplier=1``: a worker reserves only what it runs, so a
  crash strands at most one message per pool slot and idle workers get work;
* ``visibility_timeout`` (broker and, if one is ever added, result backend
  transport options) longer than ``task_time_limit``: Redis never redelivers a
  job that is still legitimately running;
* ``run_job`` is idempotent: it claims a job with a conditional UPDATE
  (queued -> running), so a redelivered or duplicated message for a job that is
  running or final does nothing, and only the latest attempt stores a response.

Messages Redis itself loses (a restart without persistence, an enqueue that
failed after the commit, a worker killed with its prefetched message) are
rebuilt from the database by the reconciler each worker runs at start-up and
every RECONCILE_INTERVAL_SECONDS.

Start a worker with ``model-api worker`` or ``celery -A model_api.worker worker``;
the worker's own wiring (a runtime per process, signal handlers, the
reconciler loop) lives in :mod:`model_api.worker`. This module is all a web
process needs to publish.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import Celery

from .settings import Settings

log = logging.getLogger(__name__)

TASK_NAME = "model_api.run_job"
#: seconds between the soft time limit (the job fails, refunded) and the hard one (the child is killed)
SOFT_LIMIT_MARGIN = 10


def celery_config(settings: Settings) -> dict[str, Any]:
    """Every Celery setting we rely on, in one place (see the module docstring)."""
    timeout = settings.celery_publish_timeout
    transport = {
        "visibility_timeout": settings.celery_visibility_timeout,
        # fail fast towards a dead broker: a submit must answer 503, not hang
        "socket_connect_timeout": timeout,
        "socket_timeout": max(timeout, 5.0),
        "retry_on_timeout": False,
        # detect a broker that vanished without closing the connection
        "health_check_interval": 10,
    }
    return {
        "broker_url": settings.celery_broker_url,
        "broker_transport_options": transport,
        # no result backend: /async_call_status reads PostgreSQL. Should one be
        # added, Redis needs the same visibility timeout there too.
        "result_backend": None,
        "result_backend_transport_options": {"visibility_timeout": settings.celery_visibility_timeout},
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": settings.celery_task_time_limit,
        "task_soft_time_limit": settings.celery_task_time_limit - SOFT_LIMIT_MARGIN,
        "task_default_queue": settings.celery_queue,
        "task_routes": {TASK_NAME: {"queue": settings.celery_queue}},
        "task_serializer": "json",
        "accept_content": ["json"],
        # publishing (the web process): a couple of quick retries survive a broker
        # restart (stale pooled connection), then give up so the request gets a 503
        "broker_connection_timeout": timeout,
        "task_publish_retry": True,
        "task_publish_retry_policy": {
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.5,
        },
        # consuming (workers): wait for the broker for ever and resume by themselves
        "broker_connection_retry": True,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
    }


def make_celery(settings: Settings, run_job: Callable[[str], Any] | None = None,
                retry_on: tuple[type[BaseException], ...] = ()) -> Celery:
    """A Celery app for these settings. ``run_job`` (a worker's: it runs the job
    in the calling process) makes it consume; without it, it only publishes.
    A run that raises one of ``retry_on`` is retried by Celery with backoff."""
    if not settings.celery_broker_url:
        raise ValueError("CELERY_BROKER_URL is not set")
    app = Celery("model_api", set_as_current=False)
    app.conf.update(celery_config(settings))
    app.conf.model_api_settings = settings  # read back by the worker hooks

    if run_job is not None:
        @app.task(name=TASK_NAME, ignore_result=True, autoretry_for=retry_on, retry_backoff=1,
                  retry_backoff_max=30, retry_jitter=False, max_retries=None)
        def _run_job(job_id: str) -> Any:
            """Run one async job (idempotent; see ``Jobs.run``)."""
            return run_job(job_id)

    return app


class CeleryQueue:
    """``jobs.JobQueue`` over Celery: publishes the job id, fast-failing if the broker is down."""

    def __init__(self, app: Celery, settings: Settings):
        self.app = app
        self.settings = settings

    def enqueue(self, job_id: str) -> None:
        self.app.send_task(TASK_NAME, args=[job_id], queue=self.settings.celery_queue)

    def check(self) -> dict[str, Any]:
        """Readiness of the broker for ``/ready``."""
        try:
            with self.app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, interval_start=0, timeout=self.settings.celery_publish_timeout)
            return {"status": "ready"}
        except Exception as exc:  # report, don't raise: /ready says what is down
            return {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:200]}

    def shutdown(self, wait: bool = False) -> None:
        self.app.close()


__all__ = ["CeleryQueue", "TASK_NAME", "celery_config", "make_celery"]
