"""The composition root: settings → database, credential cache, engines, services.

The Flask app, the CLI and Celery workers each build one ``Runtime``; routes
and tasks call its service objects (``rt.calls.run(intent)``,
``rt.jobs.submit(intent)``, ``rt.history.page(...)``), which never import Flask.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import Any

from .db import Database
from .engine.base import Engine
from .engine.registry import EngineRegistry
from .models_file import load_models_file, single_model
from .process import ProcessIdentity
from .services.auth import CredentialCache
from .services.calls import ModelCalls
from .services.history import History
from .services.jobs import CancelRegistry, JobQueue, Jobs
from .services.ledger import QuotaPolicy
from .settings import Settings

log = logging.getLogger(__name__)


def _publish_model_info(engine: Engine) -> None:
    from .observability import metrics

    try:
        metrics.set_model_info(engine.info())
    except Exception:  # a metric must never stop the model from serving
        log.exception("could not publish model info metric")


class Runtime:
    def __init__(self, settings: Settings, *, job_queue: JobQueue | None = None):
        self.settings = settings
        self.db = Database(settings.sqlalchemy_url)
        secret = hashlib.sha256(settings.secret_key.encode()).digest() if settings.secret_key else None
        self.credentials = CredentialCache(secret=secret)
        self.policy = QuotaPolicy(settings.default_quota, settings.quota_window_seconds)
        #: ``host:pid:nonce`` of this process, written on the calls it runs
        self.worker_id = ProcessIdentity()
        #: the served models by id (MODELS_FILE, else the one MODEL_* model)
        self.models = load_models_file(settings.models_file) if settings.models_file else single_model(settings.model)
        self.engines = EngineRegistry(self.models.settings, default=self.models.default, on_load=_publish_model_info)
        self.cancels = CancelRegistry(self.db, settings.cancel_poll_seconds)
        self._job_queue = job_queue
        self.calls = ModelCalls(self.db, self.engines, self.policy, self.worker_id)
        self.jobs = Jobs(self.db, self.engines, self.policy, lambda: self.job_queue, self.cancels, self.worker_id)
        self.history = History(self.db)
        # name -> callable returning {"status": "ready" | ..., ...}; the broker adds one
        self.extra_readiness_checks: dict[str, Callable[[], dict[str, Any]]] = {}
        if settings.celery_broker_url:
            self.extra_readiness_checks["broker"] = lambda: self.job_queue.check()  # type: ignore[attr-defined]

    @property
    def engine(self) -> Engine:
        """The default model, loaded on first use (blocking until it is ready)."""
        return self.engines.get()

    @property
    def job_queue(self) -> JobQueue:
        """Celery when CELERY_BROKER_URL is set, otherwise the in-process executor."""
        if self._job_queue is None and self.settings.celery_broker_url:
            from .celery_app import CeleryQueue, make_celery

            self._job_queue = CeleryQueue(make_celery(self.settings), self.settings)
        if self._job_queue is None:
            from .executor import InProcessExecutor

            self._job_queue = InProcessExecutor(
                self.jobs.run, workers=self.settings.job_workers, max_queue=self.settings.job_queue_size
            )
        return self._job_queue

    def recover_jobs(self) -> None:
        """Re-queue (or fail, refunded) what a crash left behind.

        In-process, the queue died with the process, so every queued job is
        enqueued again; with a broker, only jobs whose message looks lost
        (queued for JOB_REQUEUE_AFTER_SECONDS since they were last enqueued).
        Celery workers run this at start-up and every RECONCILE_INTERVAL_SECONDS.
        """
        s = self.settings
        self.jobs.reconcile(s.job_stale_seconds, s.job_requeue_after_seconds if s.celery_broker_url else None)

    def close(self, wait: bool = False) -> None:
        """Stop the in-process job threads (``wait``: after their current and
        queued jobs, as gunicorn's graceful shutdown does) and close the pool."""
        q = self._job_queue
        if q is not None and hasattr(q, "shutdown"):
            q.shutdown(wait=wait)  # type: ignore[attr-defined]
        self.db.dispose()
