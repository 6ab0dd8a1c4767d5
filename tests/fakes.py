"""A fake engine for fast unit tests of quota/auth/job logic only (never for endpoints'
model tests: those use the real model)."""

from __future__ import annotations

import threading

from model_api.db import Database
from model_api.engine.base import Completion, Engine, EngineError, Generation, GenerationRequest, PreparedPrompt
from model_api.engine.registry import EngineRegistry
from model_api.models import CallKind
from model_api.process import ProcessIdentity
from model_api.services.calls import ModelCalls
from model_api.services.intent import CallIntent
from model_api.services.ledger import Ledger, QuotaPolicy
from model_api.services.quota import QuotaState
from model_api.settings import ModelSettings


class _Gen(Generation):
    def __init__(self, engine: Engine, request: GenerationRequest):
        self._it = iter(engine.reply.split(" "))
        self._engine = engine
        self._request = request
        self._out: list[str] = []
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def __next__(self) -> str:
        if self._engine.fail:
            raise EngineError("fake failure")
        try:
            piece = next(self._it)
        except StopIteration:
            self.result = Completion("".join(self._out), 3, len(self._out), "stop", self._engine.model_name)
            raise
        self._out.append(piece + " ")
        return piece + " "


class FakeEngine(Engine):
    model_name = "fake"
    context_size = 64

    def __init__(self, reply: str = "hello from fake", fail: bool = False):
        self.reply = reply
        self.fail = fail
        self.started: list[_Gen] = []  # every generation handed out, to see what was started and closed

    def prepare(self, request: GenerationRequest) -> PreparedPrompt:
        text = request.prompt if request.prompt is not None else " ".join(m["content"] for m in request.messages or ())
        self.fits(len(text.split()))
        return PreparedPrompt(request, len(text.split()))

    def stream(self, prompt: PreparedPrompt, cancel: threading.Event | None = None, *,
               incremental: bool = True) -> Generation:
        gen = _Gen(self, prompt.request)
        self.started.append(gen)
        return gen


def registry_of(engine: Engine) -> EngineRegistry:
    """A registry serving ``engine`` as its default model."""
    engines = EngineRegistry({"default": ModelSettings()}, default="default")
    engines.install(None, engine)
    return engines


def model_calls(database: Database, engine: Engine, policy: QuotaPolicy = QuotaPolicy(3, None)) -> ModelCalls:
    """The call service over a real database and the given engine."""
    return ModelCalls(Ledger(database), registry_of(engine), policy, ProcessIdentity())


def intent_for(user_id: int, request: GenerationRequest, kind: CallKind = CallKind.SYNC,
               quota: QuotaState | None = None) -> CallIntent:
    return CallIntent(user_id=user_id, request=request, kind=kind, quota=quota)
