"""The embedded job queue: a bounded in-process thread pool running ``run_job``.

Used when no broker is configured. Jobs are rows in the database before they
are queued here, so a crash loses only this queue's memory, which
``jobs.recover`` rebuilds from the database (at start-up, and every
RECONCILE_INTERVAL_SECONDS for jobs whose entry was lost).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

_STOP = object()


class InProcessExecutor:
    """``retry_on``: exceptions after which a job is tried again ``retry_seconds``
    later instead of dropped (the database was unavailable to claim it: its row
    is still queued, and only this queue remembers it)."""

    def __init__(self, run: Callable[[str], object], workers: int = 2, max_queue: int = 1000,
                 retry_on: tuple[type[BaseException], ...] = (), retry_seconds: float = 2.0):
        self._run = run
        self._retry_on = retry_on
        self._retry_seconds = retry_seconds
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max_queue)
        self._threads = [
            threading.Thread(target=self._loop, name=f"job-worker-{i}", daemon=True) for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def enqueue(self, job_id: str) -> None:
        try:
            self._queue.put_nowait(job_id)
        except queue.Full:
            raise RuntimeError("the in-process job queue is full") from None

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
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
            self._queue.put_nowait(job_id)
        except queue.Full:  # the row stays queued: the reconciler re-enqueues it
            log.warning("job queue full; left to the reconciler", extra={"job_id": job_id})

    def depth(self) -> int:
        return self._queue.qsize()

    def shutdown(self, wait: bool = True) -> None:
        for _ in self._threads:
            self._queue.put(_STOP)
        if wait:
            for t in self._threads:
                t.join(timeout=30)
