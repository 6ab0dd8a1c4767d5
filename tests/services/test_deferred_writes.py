"""Final writes and job starts that meet an unavailable database are kept and
retried, not lost (the outage itself, end to end: tests/api/test_database_outage.py)."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import exc as sa_exc

from model_api.executor import InProcessExecutor
from model_api.services.ledger import DATABASE_UNAVAILABLE, DeferredWrites

from ..conftest import wait_for


def _down() -> Exception:
    return sa_exc.OperationalError("INSERT ...", {}, ConnectionRefusedError("connection refused"))


class FlakyDatabase:
    """Refuses the first ``failures`` writes, then records them in order."""

    def __init__(self, failures: int):
        self.failures = failures
        self.applied: list[str] = []

    def write(self, what: str):
        def run():
            if self.failures > 0:
                self.failures -= 1
                raise _down()
            self.applied.append(what)
            return True
        return run


def test_a_write_the_database_refuses_is_kept_and_applied_in_order_once_it_answers():
    db, writes = FlakyDatabase(failures=1), DeferredWrites(retry_seconds=0.05)
    assert writes.attempt(db.write("first"), "first") is None  # refused: kept
    assert writes.attempt(db.write("second"), "second") is True  # the database is back by now
    wait_for(lambda: len(writes) == 0, timeout=5, what="the kept write to be retried")
    assert db.applied == ["second", "first"]


def test_flush_stops_at_the_first_write_still_refused():
    db, writes = FlakyDatabase(failures=10), DeferredWrites(retry_seconds=60)
    for name in ("a", "b"):
        writes.attempt(db.write(name), name)
    assert writes.flush() == 0 and len(writes) == 2
    db.failures = 0
    assert writes.flush() == 2 and db.applied == ["a", "b"]


def test_a_write_that_can_never_succeed_is_dropped_not_retried_for_ever():
    writes = DeferredWrites(retry_seconds=60)
    db = FlakyDatabase(failures=1)
    writes.attempt(db.write("refused"), "refused")
    writes._writes.appendleft((lambda: 1 / 0, "a bug"))
    assert writes.flush() == 2 and db.applied == ["refused"]


@pytest.mark.parametrize("error", DATABASE_UNAVAILABLE)
def test_the_executor_tries_a_job_again_when_the_database_could_not_start_it(error):
    attempts: list[str] = []
    done = threading.Event()

    def run(job_id: str):
        attempts.append(job_id)
        if len(attempts) < 3:
            raise error("SELECT", {}, Exception("down")) if error is not sa_exc.TimeoutError else error()
        done.set()

    executor = InProcessExecutor(run, workers=1, retry_on=DATABASE_UNAVAILABLE, retry_seconds=0.05)
    try:
        executor.enqueue("job-1")
        assert done.wait(5)
        assert attempts == ["job-1"] * 3
    finally:
        executor.shutdown()


def test_the_executor_does_not_retry_a_bug():
    attempts: list[str] = []
    executor = InProcessExecutor(lambda job: attempts.append(job) or 1 / 0, workers=1,
                                 retry_on=DATABASE_UNAVAILABLE, retry_seconds=0.05)
    try:
        executor.enqueue("job-1")
        wait_for(lambda: attempts, timeout=5)
        threading.Event().wait(0.3)
        assert attempts == ["job-1"]
    finally:
        executor.shutdown()
