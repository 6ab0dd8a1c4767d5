"""A fake engine for fast unit tests of quota/auth/job logic only (never for endpoints'
model tests: those use the real model)."""

from __future__ import annotations

import threading

from model_api.engine.base import Completion, Engine, EngineError, Generation, GenerationRequest


class _Gen(Generation):
    def __init__(self, engine: FakeEngine, request: GenerationRequest):
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
            self.result = Completion("".join(self._out), 3, len(self._out), "stop", "fake")
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

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        text = request.prompt if request.prompt is not None else " ".join(m["content"] for m in request.messages or ())
        return len(text.split())

    def stream(self, request: GenerationRequest, cancel: threading.Event | None = None) -> Generation:
        gen = _Gen(self, request)
        self.started.append(gen)
        return gen
