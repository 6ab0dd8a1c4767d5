"""Token budgets on the real database and the limiter's arithmetic in process
memory (fake engine: this is about accounting, not the model; the same limits
across processes on real Redis are in tests/api/test_limits_live.py)."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from model_api.db import utcnow
from model_api.engine.base import EngineError, GenerationRequest, SamplingParams
from model_api.models import Call, CallKind, User
from model_api.process import ProcessIdentity
from model_api.services.calls import ModelCalls
from model_api.services.ledger import Ledger, QuotaPolicy, open_call
from model_api.services.limits import AccountLimits, BudgetExceeded, Caps, Limiter, RateLimited

from ..fakes import FakeEngine, intent_for, registry_of

# 2 prompt tokens (the fake counts words) + 50: the reservation; the fake's reply costs 3 + 3
REQ = GenerationRequest.single_prompt("hi there", SamplingParams(max_tokens=50))
RESERVED, USED = 52, 6


def _user(make_user, database, name="alice", **limits) -> int:
    make_user(name, quota=1000)
    with database.session() as s:
        uid = s.scalar(select(User.id).where(User.username == name))
        if limits:
            s.execute(update(User).where(User.id == uid).values(**limits))
    return uid


def _tokens_used(database, uid: int) -> int:
    with database.session() as s:
        return s.scalar(select(User.tokens_used).where(User.id == uid))


def _calls(database, engine, limiter=None, budget=None, window=None) -> ModelCalls:
    return ModelCalls(Ledger(database), registry_of(engine), QuotaPolicy(1000, window, budget), ProcessIdentity(),
                      limiter)


def _set(database, uid: int, **values) -> None:
    with database.session() as s:
        s.execute(update(User).where(User.id == uid).values(**values))


def test_concurrent_reservations_never_overspend_a_budget(make_user, database):
    uid = _user(make_user, database, token_budget=5 * RESERVED + RESERVED - 1)  # room for 5, not 6
    results: list[str] = []
    barrier = threading.Barrier(16)

    def one():
        barrier.wait()
        try:
            open_call(database, intent_for(uid, REQ), QuotaPolicy(1000, None), prompt_tokens=2, model="fake",
                      worker="test")
            results.append("ok")
        except BudgetExceeded:
            results.append("429")

    threads = [threading.Thread(target=one) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("ok") == 5, results
    with database.session() as s:
        assert s.scalar(select(func.count(Call.id))) == 5
        assert s.scalar(select(User.used).where(User.id == uid)) == 5  # refused calls took no unit either
    assert _tokens_used(database, uid) == 5 * RESERVED


def test_a_finished_call_is_settled_to_what_it_used(make_user, database):
    uid = _user(make_user, database, token_budget=1000)
    _calls(database, FakeEngine()).run(intent_for(uid, REQ))
    assert _tokens_used(database, uid) == USED


def test_without_a_budget_a_call_reserves_and_settles_nothing(make_user, database):
    uid = _user(make_user, database)
    calls = _calls(database, FakeEngine())
    calls.run(intent_for(uid, REQ))
    with database.session() as s:
        assert s.scalar(select(Call.reserved_tokens)) is None
    assert _tokens_used(database, uid) == 0
    with database.session() as s:  # a budget set later counts from then on
        s.execute(update(User).where(User.id == uid).values(token_budget=1000))
    calls.run(intent_for(uid, REQ))
    assert _tokens_used(database, uid) == USED


def test_a_failure_on_our_side_costs_no_tokens(make_user, database):
    uid = _user(make_user, database, token_budget=1000)
    with pytest.raises(EngineError):
        _calls(database, FakeEngine(fail=True)).run(intent_for(uid, REQ))
    assert _tokens_used(database, uid) == 0


def test_a_stream_cut_short_costs_what_it_had_used(make_user, database):
    uid = _user(make_user, database, token_budget=1000)
    call = _calls(database, FakeEngine("one two three four")).stream(intent_for(uid, REQ, CallKind.STREAM))
    next(iter(call))  # one word reaches the client
    call.cancel()
    assert _tokens_used(database, uid) == 2 + 1  # the prompt and the one word generated before the cut


def test_with_a_quota_window_the_budget_renews_with_it(make_user, database):
    uid = _user(make_user, database, token_budget=RESERVED)
    calls = _calls(database, FakeEngine(), window=3600)
    calls.run(intent_for(uid, REQ))
    with pytest.raises(BudgetExceeded):  # 6 used + 52 reserved > 52
        calls.run(intent_for(uid, REQ))
    _set(database, uid, window_started_at=utcnow() - timedelta(hours=2))  # the window has passed
    calls.run(intent_for(uid, REQ))
    assert _tokens_used(database, uid) == USED  # this window's call only


def test_a_call_reserved_in_the_last_window_settles_nothing_into_the_new_one(make_user, database):
    uid = _user(make_user, database, token_budget=1000)
    call = _calls(database, FakeEngine("one two three four"), window=3600).stream(
        intent_for(uid, REQ, CallKind.STREAM))
    next(iter(call))
    # meanwhile another call of the user's opened a new window
    _set(database, uid, window_started_at=utcnow() + timedelta(seconds=1), tokens_used=0)
    call.cancel()  # would give back 52 - 3 tokens: not to a window that never held them
    assert _tokens_used(database, uid) == 0


def test_the_default_budget_applies_to_users_without_their_own(make_user, database):
    uid = _user(make_user, database)
    with pytest.raises(BudgetExceeded) as exc:
        _calls(database, FakeEngine(), budget=RESERVED - 1).run(intent_for(uid, REQ))
    assert exc.value.whose == "user" and exc.value.budget == RESERVED - 1 and exc.value.asked == RESERVED
    with database.session() as s:
        assert s.scalar(select(func.count(Call.id))) == 0


# -- the limiter, in process memory ------------------------------------------

def _limiter(**kw) -> Limiter:
    return Limiter("memory://", Caps(), window_seconds=kw.pop("window", 60), slot_ttl=kw.pop("ttl", 900))


def test_a_concurrency_slot_is_freed_when_the_call_settles():
    limiter = _limiter()
    limits = AccountLimits(Caps(concurrency=1))
    held = limiter.admit(1, None, limits, 10)
    with pytest.raises(RateLimited) as exc:
        limiter.admit(1, None, limits, 10)
    assert exc.value.what == "concurrency" and exc.value.retry_after == 1
    held.settle(10)
    held.settle(10)  # idempotent: the second settlement frees nothing more
    limiter.admit(1, None, limits, 10)
    with pytest.raises(RateLimited):
        limiter.admit(1, None, limits, 10)


def test_a_slot_whose_holder_vanished_expires():
    limiter = _limiter(ttl=0.3)
    limits = AccountLimits(Caps(concurrency=1))
    limiter.admit(1, None, limits, 10)  # never settled: its process "died"
    time.sleep(0.4)
    limiter.admit(1, None, limits, 10)


def test_a_keys_limit_narrows_its_users_and_is_named():
    limiter = _limiter()
    limits = AccountLimits(Caps(rpm=5), Caps(rpm=1))
    limiter.admit(1, 7, limits, 10)
    with pytest.raises(RateLimited) as exc:
        limiter.admit(1, 7, limits, 10)
    assert exc.value.whose == "API key" and exc.value.limit == 1
    # the refused call was not counted against the user
    assert limiter.admit(1, None, AccountLimits(Caps(rpm=5)), 10).state.requests.remaining == 3


def test_unused_tokens_are_given_back_and_the_headers_say_so():
    limiter = _limiter()
    limits = AccountLimits(Caps(tpm=100))
    held = limiter.admit(1, None, limits, 80)
    assert held.state.tokens.remaining == 20
    with pytest.raises(RateLimited):
        limiter.admit(1, None, limits, 30)
    held.settle(10)
    assert limiter.admit(1, None, limits, 30).state.tokens.remaining == 60


def test_a_request_larger_than_the_token_limit_can_never_pass():
    with pytest.raises(RateLimited) as exc:
        _limiter().admit(1, None, AccountLimits(Caps(tpm=100)), 101)
    assert exc.value.retry_after is None


def test_the_token_retry_after_is_honest():
    limiter = _limiter(window=2)
    limits = AccountLimits(Caps(tpm=100))
    limiter.admit(1, None, limits, 90)
    with pytest.raises(RateLimited) as exc:
        limiter.admit(1, None, limits, 50)
    wait = exc.value.retry_after
    assert 1 <= wait <= 4
    time.sleep(wait)
    limiter.admit(1, None, limits, 50)


def test_no_limit_holds_nothing():
    held = _limiter().admit(1, None, AccountLimits(), 10**9)
    assert held.state.requests is None and held.state.tokens is None


def test_an_unreachable_counter_store_does_not_fail_calls():
    # nothing listens on port 1: every call is served, the limits unenforced (and a warning logged)
    limiter = Limiter("redis://127.0.0.1:1/0", Caps(rpm=1, concurrency=1))
    for _ in range(3):
        held = limiter.admit(1, None, AccountLimits(), 10)
        assert held.state.requests is None
