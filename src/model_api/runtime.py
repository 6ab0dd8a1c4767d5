"""The composition root: settings → database, credential cache, engines, services.

The Flask app, the CLI and Celery workers each build one ``Runtime``; routes
and tasks call its service objects (``rt.calls.run(intent)``,
``rt.jobs.submit(intent)``, ``rt.history.page(...)``), which never import Flask.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from .db import Database
from .engine.base import Engine
from .engine.registry import EngineRegistry, Residency
from .observability import metrics
from .models_file import load_models_file, single_model
from .process import ProcessIdentity
from .services.auth import CredentialCache
from .services.calls import ModelCalls
from .services.history import History
from .services.idempotency import Idempotency
from .services.jobs import CancelRegistry, JobQueue, Jobs
from .services.ledger import DATABASE_UNAVAILABLE, Ledger, QuotaPolicy
from .services import usage
from .services.limits import Caps, Limiter
from .services.throttle import LoginThrottle
from .services.webhooks import WebhookPolicy, Webhooks
from .settings import Settings, memory_bytes

log = logging.getLogger(__name__)


def _publish_model_info(model_id: str, engine: Engine) -> None:
    try:
        metrics.model_loaded(model_id)
        metrics.set_model_info(engine.info())
    except Exception:  # a metric must never stop the model from serving
        log.exception("could not publish model info metric")


class Runtime:
    def __init__(self, settings: Settings, *, job_queue: JobQueue | None = None):
        self.settings = settings
        self.db = Database.from_settings(settings)
        secret = hashlib.sha256(settings.secret_key.encode()).digest() if settings.secret_key else None
        self.credentials = CredentialCache(secret=secret)
        self.policy = QuotaPolicy(settings.default_quota, settings.quota_window_seconds,
                                  settings.default_token_budget)
        #: request, token and concurrency limits (README "Limits"), counted in RATE_LIMIT_STORAGE_URL
        self.limiter = Limiter(settings.rate_limit_storage_url,
                               Caps(settings.default_rpm, settings.default_tpm, settings.default_concurrency),
                               settings.limits_window_seconds, settings.concurrency_slot_ttl_seconds)
        #: ``host:pid:nonce`` of this process, written on the calls it runs
        self.worker_id = ProcessIdentity()
        #: the served models by id (MODELS_FILE, else the one MODEL_* model)
        self.models = load_models_file(settings.models_file) if settings.models_file else single_model(settings.model)
        self.engines = EngineRegistry(self.models.settings, default=self.models.default, on_load=_publish_model_info,
                                      on_unload=metrics.model_unloaded, residency=Residency(
                                          settings.model_max_loaded, memory_bytes(settings.model_memory_limit),
                                          settings.model_load_wait_seconds))
        self.cancels = CancelRegistry(self.db, settings.cancel_poll_seconds)
        self._job_queue = job_queue
        self.ledger = Ledger(self.db)
        self.calls = ModelCalls(self.ledger, self.engines, self.policy, self.worker_id, self.limiter)
        self.jobs = Jobs(self.ledger, self.engines, self.policy, lambda: self.job_queue, self.cancels, self.worker_id,
                         self.limiter)
        self.history = History(self.db)
        self.login_throttle = LoginThrottle(settings.rate_limit_storage_url, settings.login_throttle_per_account,
                                            settings.login_throttle_per_address)
        self.idempotency = Idempotency(self.db, settings.idempotency_ttl_seconds, settings.job_stale_seconds,
                                       self.worker_id)
        self.webhooks = Webhooks(self.db, WebhookPolicy(
            max_attempts=settings.webhook_max_attempts, backoff=tuple(settings.webhook_backoff),
            timeout=settings.webhook_timeout_seconds, allow_private=settings.webhook_allow_private,
            production=settings.env == "production", poll_seconds=settings.webhook_poll_seconds,
        ), housekeeping=[self.idempotency.purge_expired,
                         # closed days into the usage report's daily figures (services/usage.py)
                         lambda: usage.roll_up(self.db)])
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
                self.jobs.run, workers=self.settings.job_workers, max_queue=self.settings.job_queue_size,
                retry_on=DATABASE_UNAVAILABLE, scheduler=self.settings.model.scheduler,
            )
        return self._job_queue

    def recover_jobs(self, *, at_start: bool = False) -> None:
        """Re-queue (or fail, refunded) what a crash left behind.

        A dead process's running calls are failed and refunded (sync) or queued
        again (async). Queued jobs are enqueued again when their queue entry
        looks lost: with a broker, those queued for JOB_REQUEUE_AFTER_SECONDS
        since they were last enqueued; in-process, at start-up every one (the
        queue died with the process), later the same as with a broker.
        """
        s = self.settings
        requeue_after = None if at_start and not s.celery_broker_url else s.job_requeue_after_seconds
        self.jobs.reconcile(s.job_stale_seconds, requeue_after)

    def start_reconciler(self, *, at_start: bool = True) -> threading.Event:
        """Run :meth:`recover_jobs` now (``at_start``) and every
        RECONCILE_INTERVAL_SECONDS in a thread, so every row reaches a final
        state without a restart. The web app and each Celery worker run one.
        Set the returned event to stop it."""
        stop = threading.Event()

        def loop() -> None:
            first = at_start
            while True:
                try:
                    self.recover_jobs(at_start=first)
                    first = False
                except Exception:  # database or broker down: try again next interval
                    log.warning("reconciler pass failed", exc_info=True)
                if stop.wait(self.settings.reconcile_interval_seconds):
                    return

        threading.Thread(target=loop, name="job-reconciler", daemon=True).start()
        return stop

    def close(self, wait: bool = False) -> None:
        """Stop the in-process job threads (``wait``: after their current and
        queued jobs, as gunicorn's graceful shutdown does) and close the pool."""
        self.webhooks.stop()
        q = self._job_queue
        if q is not None and hasattr(q, "shutdown"):
            q.shutdown(wait=wait)  # type: ignore[attr-defined]
        self.db.dispose()
