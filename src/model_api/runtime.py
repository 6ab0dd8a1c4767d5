"""The composition root: settings → database, credential cache, engine, job queue.

The Flask app, the CLI and Celery workers each build one ``Runtime`` and hand
its parts to the services, which never import Flask.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from .db import Database
from .engine.base import Engine
from .services import jobs
from .services.auth import CredentialCache
from .services.calls import QuotaPolicy
from .settings import Settings

log = logging.getLogger(__name__)

# Loaded models are shared by every Runtime in the process (tests build many
# apps; a gunicorn worker builds one): loading twice would double memory.
_ENGINES: dict[tuple[Any, ...], Engine] = {}
_ENGINES_LOCK = threading.Lock()


def engine_key(settings: Settings) -> tuple[Any, ...]:
    return (
        settings.model_backend,
        settings.model_path,
        settings.model_name,
        settings.model_n_ctx,
        settings.model_n_threads,
        settings.model_n_batch,
        settings.model_n_parallel,
        settings.model_max_queue,
        settings.model_flash_attn,
        settings.model_base_url,
        settings.model_api_key,
        settings.model_timeout_seconds,
        settings.model_connect_timeout_seconds,
    )


def load_engine(settings: Settings) -> Engine:
    """Build (or reuse) the engine these settings describe."""
    key = engine_key(settings)
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            engine = _build_engine(settings)
            _ENGINES[key] = engine
        return engine


def _build_engine(settings: Settings) -> Engine:
    if settings.model_backend in ("llama", "batching"):
        common = dict(
            model_path=settings.model_path,
            n_threads=settings.model_n_threads,
            n_batch=settings.model_n_batch,
            model_name=settings.model_name,
            flash_attn=settings.model_flash_attn,
        )
        if settings.model_backend == "llama":
            from .engine.llama import LlamaEngine

            return LlamaEngine(n_ctx=settings.model_n_ctx, **common)
        from .engine.batching import BatchingEngine

        return BatchingEngine(
            n_ctx_per_seq=settings.model_n_ctx,
            n_parallel=settings.model_n_parallel,
            max_queue=settings.model_max_queue,
            **common,
        )
    if settings.model_backend == "openai":
        from .engine.remote import OpenAIEngine

        assert settings.model_base_url  # enforced by Settings
        return OpenAIEngine(
            settings.model_base_url,
            api_key=settings.model_api_key,
            model_name=settings.model_name,
            context_size=settings.model_n_ctx,
            timeout=settings.model_timeout_seconds,
            connect_timeout=settings.model_connect_timeout_seconds,
        )
    raise ValueError(f"MODEL_BACKEND={settings.model_backend!r} is not available in this build")


def _publish_model_info(engine: Engine) -> None:
    from .observability import metrics

    try:
        metrics.set_model_info(engine.info())
    except Exception:  # a metric must never stop the model from serving
        log.exception("could not publish model info metric")


class Runtime:
    def __init__(self, settings: Settings, *, job_queue: jobs.JobQueue | None = None):
        self.settings = settings
        self.db = Database.from_settings(settings)
        secret = hashlib.sha256(settings.secret_key.encode()).digest() if settings.secret_key else None
        self.credentials = CredentialCache(secret=secret)
        self.cancels = jobs.CancelRegistry(self.db, settings.cancel_poll_seconds)
        self.policy = QuotaPolicy(settings.default_quota, settings.quota_window_seconds)
        self._engine: Engine | None = None
        self._engine_error: BaseException | None = None
        self._engine_lock = threading.Lock()
        self._job_queue = job_queue
        # name -> callable returning {"status": "ready" | ..., ...}; the broker adds one
        self.extra_readiness_checks: dict[str, Callable[[], dict[str, Any]]] = {}
        if settings.celery_broker_url:
            self.extra_readiness_checks["broker"] = lambda: self.job_queue.check()  # type: ignore[attr-defined]

    # --- engine -------------------------------------------------------------
    @property
    def engine(self) -> Engine:
        """The model, loaded on first use (blocking until it is ready)."""
        if self._engine is None:
            with self._engine_lock:
                if self._engine is None:
                    try:
                        self._engine = load_engine(self.settings)
                        self._engine_error = None
                        _publish_model_info(self._engine)
                    except BaseException as exc:
                        self._engine_error = exc
                        raise
        return self._engine

    def engine_state(self) -> str:
        if self._engine is not None:
            return "ready"
        if self._engine_error is not None:
            return f"error: {self._engine_error}"
        return "loading" if self._engine_lock.locked() else "not loaded"

    def load_engine_in_background(self) -> None:
        def _load() -> None:
            try:
                self.engine  # noqa: B018 - property loads
            except Exception:
                log.exception("model failed to load")

        threading.Thread(target=_load, name="model-loader", daemon=True).start()

    # --- jobs ---------------------------------------------------------------
    def run_job(self, job_id: str, *, allow_running: bool = False) -> str | None:
        return jobs.run_job(
            job_id, self.db, lambda: self.engine, cancels=self.cancels, allow_running=allow_running
        )

    @property
    def job_queue(self) -> jobs.JobQueue:
        """Celery when CELERY_BROKER_URL is set, otherwise the in-process executor."""
        if self._job_queue is None and self.settings.celery_broker_url:
            from .celery_app import CeleryQueue, make_celery

            self._job_queue = CeleryQueue(make_celery(self.settings), self.settings)
        if self._job_queue is None:
            from .executor import InProcessExecutor

            self._job_queue = InProcessExecutor(
                self.run_job, workers=self.settings.job_workers, max_queue=self.settings.job_queue_size
            )
        return self._job_queue

    def recover_jobs(self) -> None:
        """Re-queue (or fail, refunded) what a crash left behind.

        In-process, the queue died with the process, so every queued job is
        enqueued again; with a broker, only jobs whose message looks lost
        (queued for JOB_REQUEUE_AFTER_SECONDS since they were last enqueued).
        Celery workers run this at start-up and every RECONCILE_INTERVAL_SECONDS.
        """
        requeue_after = self.settings.job_requeue_after_seconds if self.settings.celery_broker_url else None
        ids, failed = jobs.recover(self.db, self.settings.job_stale_seconds, requeue_after)
        for job_id in ids:
            try:
                self.job_queue.enqueue(job_id)
            except Exception:
                log.exception("could not re-enqueue recovered job", extra={"job_id": job_id})
        if ids or failed:
            log.info("recovered jobs", extra={"requeued": len(ids), "failed": failed})

    def close(self, wait: bool = False) -> None:
        """Stop the in-process job threads (``wait``: after their current and
        queued jobs, as gunicorn's graceful shutdown does) and close the pool."""
        q = self._job_queue
        if q is not None and hasattr(q, "shutdown"):
            q.shutdown(wait=wait)  # type: ignore[attr-defined]
        self.db.dispose()


EngineProvider = Callable[[], Engine]
