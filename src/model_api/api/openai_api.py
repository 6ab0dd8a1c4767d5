"""The OpenAI-compatible API: ``POST /v1/chat/completions``, ``POST /v1/completions``,
``GET /v1/models`` and ``GET /v1/models/{id}``. Official OpenAI SDKs work with ``base_url=".../v1"``.

Same auth (Basic or Bearer API key), same quota, same call rows as the seed's
routes; errors take OpenAI's shape (see :mod:`.errors`) with the same status codes.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

from apiflask import APIBlueprint
from flask import request

from ..engine import grammar, tools
from ..engine.base import Completion, GenerationRequest
from ..models import CallKind
from ..models_file import ModelEntry
from . import streaming
from .context import intent, may_use, model_entry, note_usage, runtime, sampling_params
from .docs import RATE_LIMIT_HEADERS, SSE_EVENT_SCHEMA, error_responses
from .errors import api_error, declare_dialect, rate_headers
from .idempotency import idempotent
from .protocol import completion_body, unsupported_parameter
from .schemas import ChatCompletionIn, CompletionIn, CompletionOut, ModelListOut, ModelOut
from .security import auth

bp = APIBlueprint("openai", __name__, url_prefix="/v1", tag="OpenAI-compatible")
# its clients (the openai SDKs) expect OpenAI's error shape, here and in streams
declare_dialect(bp, "openai")

# the same situations as the seed's routes, in OpenAI's error shape
_ERRORS = error_responses(400, 401, 403, 404, 413, 422, 429, 500, 502, 503, 504, openai=True,
                          d400="Invalid JSON or parameter",
                          d404="No model of that id or alias (`model_not_found`; nothing charged)")

_SSE = {"schema": SSE_EVENT_SCHEMA, "example": (
    'data: {"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hello"}}]}\n\n'
    "data: [DONE]\n\n")}


def _ok(description: str) -> dict[str, Any]:
    """The 200 of a generation route: one JSON object, or with ``stream: true`` an SSE stream."""
    return {"description": description, "headers": RATE_LIMIT_HEADERS,
            "content": {"application/json": {"schema": CompletionOut}, "text/event-stream": _SSE}}


#: reported as the model's ``created`` time
_STARTED = int(time.time())


def _params(data: dict[str, Any], model: ModelEntry):
    """OpenAI's fields → our validated SamplingParams (nulls mean 'default')."""
    clean = {k: v for k, v in data.items() if v is not None}
    if "max_completion_tokens" in clean:
        clean["max_tokens"] = clean["max_completion_tokens"]
    return sampling_params(clean, model)


def _refuse_unsupported(*supported: str) -> None:
    """A field we cannot honour is an error naming it, never silently dropped."""
    name = unsupported_parameter(request.get_json(silent=True), supported)
    if name is not None:
        raise api_error(400, f"Unsupported parameter: '{name}' is not supported with this model.",
                        code="unsupported_parameter", param=name)


def _response_format(data: dict[str, Any], model: ModelEntry) -> str | None:
    """``response_format``, or ``tools``: a grammar for local models (refused with
    a 400 if the schema cannot be enforced), passed through as sent to a remote
    upstream. One request asks for one of them."""
    rf = data.get("response_format")
    remote = model.backend == "openai"
    try:
        with_tools = tools.canonical(data.get("tools"), data.get("tool_choice"), enforce=not remote)
        if with_tools is not None:
            if isinstance(rf, dict) and rf.get("type") not in (None, "text"):
                raise grammar.GrammarError("use either response_format or tools, not both", "response_format")
            return with_tools
        if isinstance(rf, dict) and remote:
            return None if rf.get("type") == "text" else json.dumps(rf)
        return grammar.canonical(rf)
    except grammar.GrammarError as exc:
        raise api_error(400, str(exc), code="invalid_request", param=exc.field) from None


def _messages(data: dict[str, Any], response_format: str | None, model: ModelEntry) -> list[dict[str, Any]]:
    """The conversation the engine gets: a remote upstream reads tool turns as
    sent; a local model's chat template gets them as text (engine/tools.py)."""
    messages = [
        # the chat template knows "system"; OpenAI's newer "developer" role means the same
        {**m, "role": "system" if m["role"] == "developer" else m["role"]}
        for m in data["messages"]
    ]
    if model.backend == "openai":
        return messages
    return tools.local_messages(messages, response_format)


def _serve(gen_request: GenerationRequest, kind: CallKind, data: dict[str, Any], model: ModelEntry, *, chat: bool):
    call = intent(gen_request, kind, model)
    if data.get("stream"):
        include_usage = bool((data.get("stream_options") or {}).get("include_usage"))
        return streaming.start(call, chat=chat, include_usage=include_usage)
    outcome = runtime().calls.run(call)
    note_usage(outcome.completion)
    body = completion_body(outcome.call_id, outcome.completion, chat=chat,
                           response_format=gen_request.params.response_format)
    return body, 200, rate_headers(outcome.quota, outcome.rates)


def _stream_reply(*, chat: bool):
    """A repeated streamed request with an Idempotency-Key: the stream's text as one JSON reply."""

    def reply(call) -> tuple[dict[str, Any], int]:
        c = Completion(call.response or "", call.prompt_tokens or 0, call.completion_tokens or 0,
                       call.finish_reason or "stop", call.model or "")
        return completion_body(call.id, c, chat=chat, response_format=call.params.get("response_format")), 200

    return reply


@bp.post("/chat/completions")
@bp.auth_required(auth)
@bp.input(ChatCompletionIn, location="json",
          example={"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hello!"}]})
@bp.doc(summary="Chat completion (OpenAI-compatible)", responses={
    200: _ok("`chat.completion` object, or with `stream: true` an SSE stream of `chat.completion.chunk`s"),
    **_ERRORS})
@idempotent(stream_reply=_stream_reply(chat=True))
def chat_completions(json_data: dict):
    """Reply to a conversation. Uses one unit of quota; stored as a call of kind `chat`."""
    _refuse_unsupported("response_format", "tools", "tool_choice")
    model = model_entry(json_data.get("model"))
    params = replace(_params(json_data, model), response_format=_response_format(json_data, model))
    gen_request = GenerationRequest.chat(_messages(json_data, params.response_format, model), params)
    return _serve(gen_request, CallKind.CHAT, json_data, model, chat=True)


@bp.post("/completions")
@bp.auth_required(auth)
@bp.input(CompletionIn, location="json", example={"model": "SmolLM2-135M-Instruct", "prompt": "Once upon a time"})
@bp.doc(summary="Text completion (OpenAI-compatible)", responses={
    200: _ok("`text_completion` object, or with `stream: true` an SSE stream of them"), **_ERRORS})
@idempotent(stream_reply=_stream_reply(chat=False))
def completions(json_data: dict):
    """Continue a raw prompt (no chat template). Uses one unit of quota; stored as kind `completion`."""
    _refuse_unsupported()
    model = model_entry(json_data.get("model"))
    gen_request = GenerationRequest(prompt=json_data["prompt"], params=_params(json_data, model))
    return _serve(gen_request, CallKind.COMPLETION, json_data, model, chat=False)


def _model_view(model: ModelEntry) -> dict[str, Any]:
    """A ``model`` object, with the context size and backend OpenAI's lacks."""
    view = {"id": model.id, "object": "model", "created": _STARTED, "owned_by": model.owned_by,
            "context_length": model.context_size, "backend": model.backend, "aliases": list(model.aliases)}
    if runtime().models.lenient:
        # no MODELS_FILE: the one model, named as its engine names it (as before there were several)
        engine = runtime().engine
        view.update(id=engine.model_name, context_length=engine.context_size)
    return view


@bp.get("/models")
@bp.auth_required(auth)
@bp.doc(summary="List models (OpenAI-compatible)", responses={
    200: {"description": "The models this service serves",
          "content": {"application/json": {"schema": ModelListOut}}},
    **error_responses(401, openai=True)})
def list_models():
    """The models this service serves (MODELS_FILE) that the caller may use, with context size and backend."""
    return {"object": "list", "data": [_model_view(m) for m in runtime().models if may_use(m)]}


@bp.get("/models/<path:model_id>")
@bp.auth_required(auth)
@bp.doc(summary="Retrieve a model (OpenAI-compatible)", responses={
    200: {"description": "The model", "content": {"application/json": {"schema": ModelOut}}},
    **error_responses(401, 403, 404, openai=True, d404="No model of that id or alias")})
def retrieve_model(model_id: str):
    """One served model, by id or alias."""
    return _model_view(model_entry(model_id))
