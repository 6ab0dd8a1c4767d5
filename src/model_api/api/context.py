"""Per-request context for the model routes: the runtime, the caps applied to
what a client asked, and the one :class:`CallIntent` a route hands a service."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flask import current_app, g

from ..engine.base import Completion, GenerationRequest, SamplingParams
from ..models import CallKind
from ..services.intent import CallIntent
from .errors import api_error
from .security import current_principal

if TYPE_CHECKING:
    from ..runtime import Runtime


def runtime() -> Runtime:
    """This app's composition root (services, settings, database)."""
    return current_app.extensions["model_api"]


def sampling_params(data: dict[str, Any]) -> SamplingParams:
    """Apply defaults and server-side caps to the validated request fields."""
    s = runtime().settings
    max_tokens = data.get("max_tokens", s.default_max_tokens)
    if max_tokens > s.max_tokens_cap:
        raise api_error(400, f"max_tokens must be <= {s.max_tokens_cap}", code="invalid_request",
                        details={"max_tokens": [f"must be <= {s.max_tokens_cap}"]})
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=data.get("temperature", s.default_temperature),
        top_p=data.get("top_p", s.default_top_p),
        seed=data.get("seed"),
        stop=tuple(data.get("stop") or ()),
    )


def check_prompt_size(text: str) -> None:
    """The cheap pre-check on characters, before any tokenizer runs."""
    limit = runtime().settings.max_prompt_chars
    if len(text) > limit:
        raise api_error(422, f"prompt is {len(text)} characters; the limit is {limit}", code="prompt_too_long")


def intent(request: GenerationRequest, kind: CallKind, model: str | None = None) -> CallIntent:
    """The signed-in user's call, with the request id and the quota read with the credentials."""
    user = current_principal()
    return CallIntent(user_id=user.id, request=request, kind=kind, request_id=g.get("request_id"),
                      quota=user.quota, model=model)


def note_usage(c: Completion) -> None:
    """What the access log line reports for this request."""
    g.usage = (c.prompt_tokens, c.completion_tokens, c.generation_seconds)
