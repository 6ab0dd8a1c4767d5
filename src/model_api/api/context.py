"""Per-request context for the model routes: the runtime, the caps applied to
what a client asked, and the one :class:`CallIntent` a route hands a service."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from flask import current_app, g

from ..engine.base import Completion, GenerationRequest, SamplingParams, Tenant
from ..models import CallKind
from ..models_file import ModelEntry
from ..services import access
from ..services.intent import CallIntent
from .errors import api_error, request_dialect
from .security import current_principal

if TYPE_CHECKING:
    from ..runtime import Runtime


def runtime() -> Runtime:
    """This app's composition root (services, settings, database)."""
    return current_app.extensions["model_api"]


def model_entry(name: str | None) -> ModelEntry:
    """The served model a request names (None: the default) if the caller may use
    it, checked before anything is charged or written: UnknownModel (404) or
    ModelNotAllowed (403) otherwise."""
    entry = runtime().models.resolve(name)
    access.check(current_principal().models, entry.id)
    return entry


def may_use(entry: ModelEntry) -> bool:
    """Whether the signed-in caller may use this model (what /v1/models lists)."""
    allowed = current_principal().models
    return allowed is None or entry.id in allowed


def sampling_params(data: dict[str, Any], model: ModelEntry | None = None) -> SamplingParams:
    """Apply defaults and server-side caps to the validated request fields: the
    model's own (MODELS_FILE) where it has them, else the process-wide settings."""
    s = runtime().settings
    m = model or ModelEntry("", s.model)
    cap = m.max_tokens_cap or s.max_tokens_cap
    default_max = m.max_tokens or (min(s.default_max_tokens, cap) if m.max_tokens_cap else s.default_max_tokens)
    max_tokens = data.get("max_tokens", default_max)
    if max_tokens > cap:
        raise api_error(400, f"max_tokens must be <= {cap}", code="invalid_request",
                        details={"max_tokens": [f"must be <= {cap}"]})
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=data.get("temperature", s.default_temperature if m.temperature is None else m.temperature),
        top_p=data.get("top_p", m.top_p or s.default_top_p),
        seed=data.get("seed"),
        stop=tuple(data.get("stop") or ()),
    )


def refuse_long_prompt(chars: int, limit: int) -> None:
    """A prompt over MAX_PROMPT_CHARS, in the route's dialect."""
    if request_dialect() == "openai":  # OpenAI answers an over-long string with a 400
        raise api_error(400, f"The input is {chars} characters; the limit is {limit}.",
                        code="string_above_max_length")
    raise api_error(422, f"prompt is {chars} characters; the limit is {limit}", code="prompt_too_long")


def intent(request: GenerationRequest, kind: CallKind, model: ModelEntry | None = None) -> CallIntent:
    """The signed-in user's call, with the request id, the quota and limits read
    with the credentials, the model (None: the default) and those of its
    fallbacks the caller may use. The request names the user (weighted by the
    key's priority) for the engine's fair scheduler."""
    user = current_principal()
    fallbacks = () if model is None else tuple(
        f for f in model.fallbacks if user.models is None or f in user.models)
    request = replace(request, tenant=Tenant(user.id, user.limits.priority))
    return CallIntent(user_id=user.id, request=request, kind=kind, request_id=g.get("request_id"),
                      api_key_id=user.api_key_id, quota=user.quota, model=None if model is None else model.id,
                      fallbacks=fallbacks, limits=user.limits)


def note_usage(c: Completion, state: Any = None) -> None:
    """What the access log line reports for this request. A streamed body ends after
    the request context: it passes the request's ``g``, kept when the stream began."""
    (g if state is None else state).usage = (c.prompt_tokens, c.completion_tokens, c.generation_seconds)
