"""Synchronous and streamed model calls: admit, generate, record.

A call's cheapest refusals come first (a quota visibly spent, then a prompt
that cannot fit), and nothing is charged or written for them. Then the model
starts, and the unit is reserved and the row written while it reads the
prompt: the database work overlaps prompt processing instead of delaying it.
The atomic reservation still decides: if it finds no unit left (a concurrent
call took the last one) or the database fails, the generation is cancelled at
the engine's next step and the error propagates, nothing charged or written.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace

from ..engine.base import Completion, ContextOverflow, Engine, EngineError, Generation, PreparedPrompt
from ..engine.registry import EngineRegistry
from ..models import CallKind
from .intent import CallIntent
from .ledger import Ledger, QuotaPolicy, open_call, refuse_if_spent, reservation
from .limits import NOTHING_HELD, Admission, Limiter, RateLimited, RateState, account_limits
from .quota import QuotaState
from .streaming import StreamingCall

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CallOutcome:
    """What a route needs to shape its reply."""

    call_id: uuid.UUID
    quota: QuotaState
    completion: Completion | None = None
    #: the caller's request and token rate limits after this call (x-ratelimit-* headers)
    rates: RateState = RateState()


@dataclass(frozen=True)
class _Started:
    gen: Generation
    call_id: uuid.UUID
    quota: QuotaState
    prompt_tokens: int
    model: str
    admission: Admission = NOTHING_HELD


def with_limits(db, intent: CallIntent) -> CallIntent:
    """The intent with its caller's limits. A signed-in request's come with its
    credentials; others (tools, tests) are read here, once, for both admission
    and the token-budget check of the call's row."""
    if intent.limits is not None:
        return intent
    with db.session() as s:
        return replace(intent, limits=account_limits(s, intent.user_id, intent.api_key_id))


def admit(limiter: Limiter | None, intent: CallIntent, prompt_tokens: int) -> Admission:
    """Count a call against its caller's rate and concurrency limits (raises
    RateLimited, nothing counted). ``intent`` carries its limits (:func:`with_limits`).
    An async job holds no concurrency slot: it is in flight only while it waits or
    runs, which the fair queue shares out."""
    if limiter is None:
        return NOTHING_HELD
    limits = intent.limits
    assert limits is not None, "admit() needs the intent's limits: with_limits()"
    try:
        return limiter.admit(intent.user_id, intent.api_key_id, limits, reservation(prompt_tokens, intent.request),
                             hold_slot=intent.kind != CallKind.ASYNC)
    except RateLimited as exc:
        exc.quota = intent.quota  # a 429 reports the quota too (X-RateLimit-*)
        log.info("rate limited", extra={"limit_kind": exc.what, "limit_of": exc.whose, "limit": exc.limit,
                                        "retry_after": exc.retry_after})
        raise


class ModelCalls:
    def __init__(self, ledger: Ledger, engines: EngineRegistry, policy: QuotaPolicy, worker: Callable[[], str],
                 limiter: Limiter | None = None):
        self.ledger = ledger
        self.db = ledger.db
        self.engines = engines
        self.policy = policy
        self.worker = worker
        self.limiter = limiter

    def run(self, intent: CallIntent, cancel: threading.Event | None = None) -> CallOutcome:
        """Admit, generate and record one call, waiting for its whole reply.

        Raises ContextOverflow, QuotaExceeded, BudgetExceeded, RateLimited or
        EngineBusy with nothing charged or written; EngineError after recording
        the failure and refunding the unit. A database that fails after the model
        answered delays the row's final write (:class:`DeferredWrites`), not the reply.
        """
        # read only at its end: a remote upstream answers it in one piece (engine/remote.py)
        started = self._start(intent, cancel, incremental=False)
        try:
            with self.ledger.failures_recorded(started.call_id):
                for _ in started.gen:
                    pass
        except BaseException:
            started.admission.settle(0)
            raise
        result = started.gen.result
        assert result is not None
        self.ledger.complete(started.call_id, result)
        started.admission.settle(result.prompt_tokens + result.completion_tokens)
        return CallOutcome(started.call_id, started.quota, result, started.admission.state)

    def stream(self, intent: CallIntent) -> StreamingCall:
        """Admit a streamed call and run it to its first delta, so that everything
        before the first token (refusals as :meth:`run`; EngineError recorded and
        refunded) can still be answered with a status code."""
        started = self._start(intent, threading.Event(), incremental=True)
        try:
            with self.ledger.failures_recorded(started.call_id):
                call = StreamingCall(self.ledger, started.call_id, started.quota, started.gen, started.model,
                                     started.prompt_tokens, started.admission)
                call.prime()
        except BaseException:
            started.admission.settle(0)
            raise
        return call

    def _start(self, intent: CallIntent, cancel: threading.Event | None, *, incremental: bool) -> _Started:
        refuse_if_spent(self.db, intent)
        intent = with_limits(self.db, intent)
        if intent.fallbacks:
            model_id, engine, prompt, gen = start_generation(self.engines, intent, cancel, incremental=incremental)
            intent = replace(intent, model=model_id)  # the row names the model that answers
            try:
                admission = admit(self.limiter, intent, prompt.n_tokens)
            except BaseException:
                gen.close()
                raise
        else:  # the common path stays three frames below the route (tests/api/test_request_path.py)
            engine = self.engines.get(intent.model)
            prompt = engine.prepare(intent.request)
            admission = admit(self.limiter, intent, prompt.n_tokens)
            try:
                gen = engine.stream(prompt, cancel, incremental=incremental)
            except BaseException:
                admission.settle(0)
                raise
        try:
            call_id, state = open_call(self.db, intent, self.policy, prompt_tokens=prompt.n_tokens,
                                       model=engine.model_name, worker=self.worker())
        except BaseException:
            gen.close()
            admission.settle(0)
            raise
        return _Started(gen, call_id, state, prompt.n_tokens, engine.model_name, admission)


def start_generation(engines: EngineRegistry, intent: CallIntent, cancel: threading.Event | None, *,
                     incremental: bool = True) -> tuple[str | None, Engine, PreparedPrompt, Generation]:
    """Start the intent's model, or when it fails before its first token (an
    upstream down, erroring or at capacity; a model that cannot load) its
    fallbacks in order. Returns (model id, engine, prompt, generation).

    Without fallbacks the generation is returned unstarted, as it always was;
    with some, each candidate but the last is run to its first delta (the only
    way to know it answers), and that delta is handed on first. A prompt that
    does not fit is the client's problem, not the model's: no fallback for it.
    ``incremental``: as :meth:`Engine.stream` takes it.
    """
    candidates = (intent.model, *intent.fallbacks)
    for i, model_id in enumerate(candidates):
        last = i == len(candidates) - 1
        try:
            engine = engines.get(model_id)
            prompt = engine.prepare(intent.request)
            gen = engine.stream(prompt, cancel, incremental=incremental)
            if last:
                return model_id, engine, prompt, gen
            try:
                first: str | None = next(gen)
            except StopIteration:
                first = None
            return model_id, engine, prompt, _Primed(gen, first)
        except ContextOverflow:
            raise
        except Exception as exc:
            if last or not isinstance(exc, (EngineError, OSError, ValueError)):
                raise
            log.warning("model failed before its first token; trying its fallback",
                        extra={"model": model_id, "fallback": candidates[i + 1], "error": str(exc)[:200]})
    raise AssertionError("unreachable")  # pragma: no cover


class _Primed(Generation):
    """A generation already run to its first delta (``None``: it ended before any)."""

    def __init__(self, gen: Generation, first: str | None):
        self._gen = gen
        self._first = first
        self._started = False

    @property
    def result(self) -> Completion | None:  # type: ignore[override]
        return self._gen.result

    def __next__(self) -> str:
        if not self._started:
            self._started = True
            if self._first is None:
                raise StopIteration
            return self._first
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()
