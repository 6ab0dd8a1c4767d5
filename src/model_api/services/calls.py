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

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from ..engine.base import Completion, Generation
from ..engine.registry import EngineRegistry
from .intent import CallIntent
from .ledger import Ledger, QuotaPolicy, open_call, refuse_if_spent
from .quota import QuotaState
from .streaming import StreamingCall


@dataclass(frozen=True)
class CallOutcome:
    """What a route needs to shape its reply."""

    call_id: uuid.UUID
    quota: QuotaState
    completion: Completion | None = None


@dataclass(frozen=True)
class _Started:
    gen: Generation
    call_id: uuid.UUID
    quota: QuotaState
    prompt_tokens: int
    model: str


class ModelCalls:
    def __init__(self, ledger: Ledger, engines: EngineRegistry, policy: QuotaPolicy, worker: Callable[[], str]):
        self.ledger = ledger
        self.db = ledger.db
        self.engines = engines
        self.policy = policy
        self.worker = worker

    def run(self, intent: CallIntent, cancel: threading.Event | None = None) -> CallOutcome:
        """Admit, generate and record one call, waiting for its whole reply.

        Raises ContextOverflow, QuotaExceeded or EngineBusy with nothing charged
        or written; EngineError after recording the failure and refunding the unit.
        A database that fails after the model answered delays the row's final
        write (:class:`DeferredWrites`), not the reply.
        """
        started = self._start(intent, cancel)
        with self.ledger.failures_recorded(started.call_id):
            for _ in started.gen:
                pass
        result = started.gen.result
        assert result is not None
        self.ledger.complete(started.call_id, result)
        return CallOutcome(started.call_id, started.quota, result)

    def stream(self, intent: CallIntent) -> StreamingCall:
        """Admit a streamed call and run it to its first delta, so that everything
        before the first token (refusals as :meth:`run`; EngineError recorded and
        refunded) can still be answered with a status code."""
        started = self._start(intent, threading.Event())
        with self.ledger.failures_recorded(started.call_id):
            call = StreamingCall(self.ledger, started.call_id, started.quota, started.gen, started.model,
                                 started.prompt_tokens)
            call.prime()
        return call

    def _start(self, intent: CallIntent, cancel: threading.Event | None) -> _Started:
        refuse_if_spent(self.db, intent)
        engine = self.engines.get(intent.model)
        prompt = engine.prepare(intent.request)
        gen = engine.stream(prompt, cancel)
        try:
            call_id, state = open_call(self.db, intent, self.policy, prompt_tokens=prompt.n_tokens,
                                       model=engine.model_name, worker=self.worker())
        except BaseException:
            gen.close()
            raise
        return _Started(gen, call_id, state, prompt.n_tokens, engine.model_name)
