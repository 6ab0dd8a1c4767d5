"""The engine interface: the only contract between the API and a language model.

Routes, services and Celery tasks talk to an :class:`Engine`; only engine
implementations touch llama.cpp (or an upstream HTTP server).  Keeping the
surface this small is what lets a serialising engine, a continuous-batching
scheduler and a remote OpenAI-compatible backend be swapped by configuration.
"""

from __future__ import annotations

import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings (already validated and capped by the API)."""

    max_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int | None = None
    stop: tuple[str, ...] = ()
    #: OpenAI's response_format as canonical JSON (engine/grammar.py); None: free text
    response_format: str | None = None

    @property
    def greedy(self) -> bool:
        """Temperature 0 (or below): always the most likely token, no draw."""
        return self.temperature <= 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (a call row stores this, and an async job is rebuilt from it)."""
        out = {**asdict(self), "stop": list(self.stop)}
        if out["response_format"] is None:
            del out["response_format"]  # rows of free-text calls look as they always did
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingParams:
        """The inverse of :meth:`to_dict`; unknown keys are ignored, and a key a
        row does not have takes the one default above."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "stop" in values:
            values["stop"] = tuple(values["stop"] or ())
        return cls(**values)


@dataclass(frozen=True)
class Tenant:
    """Whom a generation is for, as a fair scheduler sees it: requests of one
    ``key`` (a user) are served in turn with other keys', ``weight`` turns at a time."""

    key: int | str
    weight: int = 1


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate from: chat ``messages`` (chat template applied by the
    engine) or a raw ``prompt`` string (used verbatim), never both."""

    messages: tuple[dict[str, str], ...] | None = None
    prompt: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    #: whom it is for (engine/scheduling.py); None: a tenant of its own
    tenant: Tenant | None = field(default=None, compare=False)

    @classmethod
    def chat(cls, messages: list[dict[str, str]], params: SamplingParams) -> GenerationRequest:
        return cls(messages=tuple(dict(m) for m in messages), params=params)

    @classmethod
    def single_prompt(cls, prompt: str, params: SamplingParams) -> GenerationRequest:
        """The seed's ``{"prompt": ...}`` is a single user turn of a chat."""
        return cls.chat([{"role": "user", "content": prompt}], params)


@dataclass(frozen=True, eq=False)
class PreparedPrompt:
    """A request whose prompt an engine has rendered and tokenized, once.

    Made by :meth:`Engine.prepare` and handed back to :meth:`Engine.stream` of
    the same engine: the token count charged, stored and checked against the
    context is the one the model then reads.
    """

    request: GenerationRequest
    n_tokens: int
    #: the prompt's tokens, for engines with a local tokenizer (None for remote ones)
    tokens: list[int] | None = None

    @property
    def params(self) -> SamplingParams:
        return self.request.params


#: what no database text column or encoder takes: NUL (PostgreSQL refuses it) and unpaired
#: surrogates ("\ud800" is valid JSON but not Unicode text). Requests are refused for it
#: (api/schemas.py check_text); a model's reply is stored with U+FFFD (services/ledger.py).
UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
_UNPAIRED_SURROGATE = re.compile("[\ud800-\udfff]")


def unicode_text(text: str) -> str:
    """``text`` with each unpaired surrogate (which a remote model's JSON can carry as
    ``"\\ud800"``, and which no encoder takes: a stream would break on it) replaced by
    U+FFFD, as a local model's invalid UTF-8 already is."""
    return _UNPAIRED_SURROGATE.sub("\ufffd", text)


@dataclass
class Completion:
    """The outcome of one generation."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    # "stop" (EOS or stop string), "length" (max_tokens or context end), "cancelled"
    finish_reason: str
    model: str
    time_to_first_token: float | None = None
    generation_seconds: float = 0.0
    # Prompt tokens (of prompt_tokens) whose KV cells an earlier request left
    # behind, so they were not computed again; only BatchingEngine reuses any.
    cached_tokens: int = 0


class Generation(Iterator[str]):
    """An in-flight generation: iterate for text deltas as they are produced;
    after the iterator is exhausted, :attr:`result` holds the :class:`Completion`.

    Closing it (or setting the ``cancel`` event given to :meth:`Engine.stream`)
    stops the work at the next token; the result then has
    ``finish_reason == "cancelled"`` and whatever text had been produced.
    """

    result: Completion | None = None

    def close(self) -> None:  # pragma: no cover - default no-op
        pass


class EngineError(Exception):
    """The model failed through no fault of the client (a server fault: refund)."""


class ContextOverflow(EngineError):
    """The prompt (plus at least one generated token) does not fit the context."""

    def __init__(self, prompt_tokens: int, context_size: int):
        super().__init__(
            f"prompt is {prompt_tokens} tokens; this model's context holds {context_size} "
            "including at least one generated token"
        )
        self.prompt_tokens = prompt_tokens
        self.context_size = context_size


class EngineBusy(EngineError):
    """Admission control refused the request: the wait queue is full."""

    def __init__(self, retry_after: int):
        super().__init__(f"the model is at capacity; retry in {retry_after} s")
        self.retry_after = retry_after


class UpstreamError(EngineError):
    """A remote backend answered with an error or not at all (502)."""


class UpstreamTimeout(UpstreamError):
    """A remote backend did not answer in time (504)."""


class Engine(ABC):
    """A loaded model that can serve concurrent generation requests safely."""

    model_name: str
    context_size: int

    @abstractmethod
    def prepare(self, request: GenerationRequest) -> PreparedPrompt:
        """Render and tokenize the prompt; raise :class:`ContextOverflow` (before
        any work, and before quota is charged) when it cannot fit."""

    def fits(self, n_tokens: int) -> None:
        """Raise ContextOverflow unless ``n_tokens`` leave room for one generated token."""
        if n_tokens + 1 > self.context_size:
            raise ContextOverflow(n_tokens, self.context_size)

    @abstractmethod
    def stream(self, prompt: PreparedPrompt, cancel: threading.Event | None = None, *,
               incremental: bool = True) -> Generation:
        """Start a generation of a prompt this engine prepared; safe to call from many threads.

        ``incremental=False``: the caller reads the text only at the end (a whole
        reply), so the engine may hand it over in one piece. The remote engine then
        asks its upstream for one answer instead of an event stream; local engines
        produce tokens one by one either way."""

    def generate(
        self, prompt: PreparedPrompt | GenerationRequest, cancel: threading.Event | None = None
    ) -> Completion:
        """Run a generation to the end and return its result (a bare request is prepared first)."""
        if isinstance(prompt, GenerationRequest):
            prompt = self.prepare(prompt)
        gen = self.stream(prompt, cancel, incremental=False)
        for _ in gen:
            pass
        assert gen.result is not None
        return gen.result

    def in_flight(self) -> int:
        """Generations started and not yet ended (the registry never unloads an
        engine that has any)."""
        return 0

    def info(self) -> dict[str, Any]:
        """Facts for /ready and the model-info metric."""
        return {"name": self.model_name, "context_size": self.context_size}

    def close(self) -> None:
        """Free the model (used by tests and at shutdown)."""
