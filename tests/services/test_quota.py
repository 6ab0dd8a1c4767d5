"""Quota logic on the real database (fake engine: this is about accounting, not the model)."""

import threading
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from model_api.db import utcnow
from model_api.engine.base import EngineError, GenerationRequest, SamplingParams
from model_api.models import Call, User
from model_api.services import quota

from ..fakes import FakeEngine, intent_for, model_calls

REQ = GenerationRequest.single_prompt("hi there", SamplingParams(max_tokens=4))


def _user_id(database, name="alice"):
    with database.session() as s:
        return s.scalar(select(User.id).where(User.username == name))


def test_concurrent_reservations_never_over_admit(make_user, database):
    make_user("alice", quota=5)
    uid = _user_id(database)
    engine = FakeEngine()
    results: list[str] = []
    barrier = threading.Barrier(16)

    def one():
        barrier.wait()
        try:
            model_calls(database, engine).run(intent_for(uid, REQ))
            results.append("ok")
        except quota.QuotaExceeded:
            results.append("429")

    threads = [threading.Thread(target=one) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("ok") == 5 and results.count("429") == 11  # per-user quota 5 beats the default 3
    with database.session() as s:
        assert s.scalar(select(func.count(Call.id))) == 5


def test_failed_call_refunds_exactly_once(make_user, database):
    make_user("alice")
    uid = _user_id(database)
    with pytest.raises(EngineError):
        model_calls(database, FakeEngine(fail=True)).run(intent_for(uid, REQ))
    with database.session() as s:
        call = s.scalars(select(Call)).one()
        assert s.get(User, uid).used == 0 and call.charged is False
        assert quota.refund(s, call.id) is False  # a second refund is a no-op
        assert s.get(User, uid).used == 0


def test_quota_spent_at_sign_in_is_refused_before_the_model_starts(make_user, database):
    make_user("alice", quota=1)
    uid = _user_id(database)
    engine = FakeEngine()
    with pytest.raises(quota.QuotaExceeded):
        model_calls(database, engine).run(intent_for(uid, REQ, quota=quota.QuotaState(limit=1, remaining=0)))
    assert engine.started == []  # no model work for a caller known to be out of quota
    with database.session() as s:
        assert s.scalar(select(func.count(Call.id))) == 0 and s.get(User, uid).used == 0


def test_reservation_lost_to_a_concurrent_call_cancels_the_started_model(make_user, database):
    """The hint read at sign-in said one unit was left, but another call took it
    meanwhile: the reservation decides, the started generation is closed, nothing is written."""
    make_user("alice", quota=1)
    uid = _user_id(database)
    model_calls(database, FakeEngine()).run(intent_for(uid, REQ))  # takes the last unit
    engine = FakeEngine()
    with pytest.raises(quota.QuotaExceeded):
        model_calls(database, engine).run(intent_for(uid, REQ, quota=quota.QuotaState(limit=1, remaining=1)))
    [gen] = engine.started
    assert gen.closed and gen.result is None
    with database.session() as s:
        assert s.scalar(select(func.count(Call.id))) == 1 and s.get(User, uid).used == 1


def test_zero_quota_admits_nothing(make_user, database):
    make_user("alice", quota=0)
    with database.session() as s, pytest.raises(quota.QuotaExceeded):
        quota.reserve(s, _user_id(database), 3, None)
    with database.session() as s, pytest.raises(quota.QuotaExceeded):
        quota.reserve(s, _user_id(database), 3, 60)


def test_window_renews_the_allowance(make_user, database):
    make_user("alice")
    uid = _user_id(database)
    for _ in range(3):
        with database.session() as s:
            quota.reserve(s, uid, 3, 60)
    with database.session() as s, pytest.raises(quota.QuotaExceeded) as exc:
        quota.reserve(s, uid, 3, 60)
    assert 0 < exc.value.state.retry_after <= 60
    with database.session() as s:  # the window started over a minute ago
        s.get(User, uid).window_started_at = utcnow() - timedelta(seconds=61)
    with database.session() as s:
        st = quota.reserve(s, uid, 3, 60)
    assert st.remaining == 2
