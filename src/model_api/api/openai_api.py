"""The OpenAI-compatible API: ``POST /v1/chat/completions``, ``POST /v1/completions``,
``GET /v1/models``. Official OpenAI SDKs work with ``base_url=".../v1"``.

Same auth (Basic or Bearer API key), same quota, same call rows as the seed's
routes; errors take OpenAI's shape (see :mod:`.errors`) with the same status codes.
"""

from __future__ import annotations

import time
from typing import Any

from apiflask import APIBlueprint

from ..engine.base import Completion, GenerationRequest
from ..models import CallKind
from . import streaming
from .context import check_prompt_size, intent, note_usage, runtime, sampling_params
from .docs import RATE_LIMIT_HEADERS, SSE_EVENT_SCHEMA, error_responses
from .errors import declare_dialect, rate_headers
from .idempotency import idempotent
from .protocol import completion_body
from .schemas import ChatCompletionIn, CompletionIn, CompletionOut, ModelListOut
from .security import auth

bp = APIBlueprint("openai", __name__, url_prefix="/v1", tag="OpenAI-compatible")
# its clients (the openai SDKs) expect OpenAI's error shape, here and in streams
declare_dialect(bp, "openai")

# the same situations as the seed's routes, in OpenAI's error shape
_ERRORS = error_responses(400, 401, 413, 422, 429, 500, 502, 503, 504, openai=True,
                          d400="Invalid JSON or parameter")

_SSE = {"schema": SSE_EVENT_SCHEMA, "example": (
    'data: {"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hello"}}]}\n\n'
    "data: [DONE]\n\n")}


def _ok(description: str) -> dict[str, Any]:
    """The 200 of a generation route: one JSON object, or with ``stream: true`` an SSE stream."""
    return {"description": description, "headers": RATE_LIMIT_HEADERS,
            "content": {"application/json": {"schema": CompletionOut}, "text/event-stream": _SSE}}


#: reported as the model's ``created`` time
_STARTED = int(time.time())


def _params(data: dict[str, Any]):
    """OpenAI's fields → our validated SamplingParams (nulls mean 'default')."""
    clean = {k: v for k, v in data.items() if v is not None}
    if "max_completion_tokens" in clean:
        clean["max_tokens"] = clean["max_completion_tokens"]
    return sampling_params(clean)


def _serve(gen_request: GenerationRequest, kind: CallKind, data: dict[str, Any], *, chat: bool):
    call = intent(gen_request, kind)
    if data.get("stream"):
        include_usage = bool((data.get("stream_options") or {}).get("include_usage"))
        return streaming.start(call, chat=chat, include_usage=include_usage)
    outcome = runtime().calls.run(call)
    note_usage(outcome.completion)
    return completion_body(outcome.call_id, outcome.completion, chat=chat), 200, rate_headers(outcome.quota)


def _stream_reply(*, chat: bool):
    """A repeated streamed request with an Idempotency-Key: the stream's text as one JSON reply."""

    def reply(call) -> tuple[dict[str, Any], int]:
        c = Completion(call.response or "", call.prompt_tokens or 0, call.completion_tokens or 0,
                       call.finish_reason or "stop", call.model or "")
        return completion_body(call.id, c, chat=chat), 200

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
    messages = [
        # the chat template knows "system"; OpenAI's newer "developer" role means the same
        {"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]}
        for m in json_data["messages"]
    ]
    check_prompt_size("".join(m["content"] for m in messages))
    gen_request = GenerationRequest.chat(messages, _params(json_data))
    return _serve(gen_request, CallKind.CHAT, json_data, chat=True)


@bp.post("/completions")
@bp.auth_required(auth)
@bp.input(CompletionIn, location="json", example={"model": "SmolLM2-135M-Instruct", "prompt": "Once upon a time"})
@bp.doc(summary="Text completion (OpenAI-compatible)", responses={
    200: _ok("`text_completion` object, or with `stream: true` an SSE stream of them"), **_ERRORS})
@idempotent(stream_reply=_stream_reply(chat=False))
def completions(json_data: dict):
    """Continue a raw prompt (no chat template). Uses one unit of quota; stored as kind `completion`."""
    check_prompt_size(json_data["prompt"])
    gen_request = GenerationRequest(prompt=json_data["prompt"], params=_params(json_data))
    return _serve(gen_request, CallKind.COMPLETION, json_data, chat=False)


@bp.get("/models")
@bp.auth_required(auth)
@bp.doc(summary="List models (OpenAI-compatible)", responses={
    200: {"description": "The one model this service serves",
          "content": {"application/json": {"schema": ModelListOut}}},
    **error_responses(401, openai=True)})
def list_models():
    """The one model this service serves."""
    engine = runtime().engine
    return {"object": "list", "data": [
        {"id": engine.model_name, "object": "model", "created": _STARTED, "owned_by": "model-api"}]}
