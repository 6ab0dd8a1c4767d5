"""The embedded job queue: a bounded in-process thread pool running ``run_job``.

Used when no broker is configured. Jobs are rows in the database before they
are queued here, so a crash loses only this queue's memory, which
``jobs.recover`` rebuilds from the database (at start-up, and every
RECONCILE_INTERVAL_SECONDS for jobs whose entry was lost).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from .engine.base import Tenant
from .engine.scheduling import Scheduler, make_queue

log = logging.getLogger(__name__)


class InProcessExecutor:
    """``retry_on``: exceptions after which a job is tried again ``retry_seconds``
    later instead of dropped (the database was unavailable to claim it: its row
    is still queued, and only this queue remembers it).

    ``scheduler`` (MODEL_SCHEDULER): ``fair`` takes users' jobs in turn
    (engine/scheduling.py), so one user's thousand queued jobs do not hold up
    another's one; ``fifo``: in submission order."""

    def __init__(self, run: Callable[[str], object], workers: int = 2, max_queue: int = 1000,
                 retry_on: tuple[type[BaseException], ...] = (), retry_seconds: float = 2.0,
                 scheduler: Scheduler = "fair"):
        self._run = run
        self._retry_on = retry_on
        self._retry_seconds = retry_seconds
        self._max = max_queue
        self._pending = make_queue(scheduler)
        self._cond = threading.Condition()
        self._stopping = False
        self._threads = [
            threading.Thread(target=self._loop, name=f"job-worker-{i}", daemon=True) for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def enqueue(self, job_id: str, tenant: Tenant | None = None) -> None:
        with self._cond:
            if len(self._pending) >= self._max:
                raise RuntimeError("the in-process job queue is full")
            self._pending.push(job_id, tenant)
            self._cond.notify()

    def enqueue_for(self, job_id: str, user_id: int, weight: int = 1) -> None:
        """Queue a job of this user's (served in turn with other users' jobs,
        ``weight`` at a time: its API key's priority)."""
        self.enqueue(job_id, Tenant(user_id, weight))

    def _next(self) -> str | None:
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            return self._pending.pop()  # None: stopping with nothing left

    def _loop(self) -> None:
        while True:
            item = self._next()
            if item is None:
                return
            try:
                self._run(str(item))
            except self._retry_on as exc:
                log.warning("job not started; retrying", extra={"job_id": item, "error": type(exc).__name__})
                self._later(str(item))
            except Exception:  # the runner records failures itself; never let a worker die
                log.exception("job runner crashed", extra={"job_id": item})

    def _later(self, job_id: str) -> None:
        timer = threading.Timer(self._retry_seconds, self._requeue, args=(job_id,))
        timer.daemon = True
        timer.start()

    def _requeue(self, job_id: str) -> None:
        try:
            self.enqueue(job_id)
        except RuntimeError:  # the row stays queued: the reconciler re-enqueues it
            log.warning("job queue full; left to the reconciler", extra={"job_id": job_id})

    def depth(self) -> int:
        with self._cond:
            return len(self._pending)

    def shutdown(self, wait: bool = True) -> None:
        """Stop the threads once the queued jobs are done (``wait``: block until then)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if wait:
            for t in self._threads:
                t.join(timeout=30)
