"""Request/response schemas: they validate input *and* generate the OpenAPI document."""

from __future__ import annotations

from typing import Any

from apiflask import Schema
from apiflask import fields as af
from apiflask.fields import Dict, Integer, List, Nested
from apiflask.validators import Length, OneOf, Range
from flask import current_app, has_app_context
from marshmallow import EXCLUDE, ValidationError, fields, post_load, validates, validates_schema

from ..engine.base import UNSTORABLE

# --- input fields that take JSON's types as they are -----------------------------------
# Request bodies are JSON: a number is a number and a boolean a boolean. marshmallow's
# defaults would also read "0.5", "5" and "yes" (or true as 1), hiding client bugs, so
# the fields below accept only their own JSON type. Every text field refuses what the
# database and the tokenizer cannot take: NUL, and lone surrogates ("\ud800" is valid
# JSON but not Unicode text): engine/base.py UNSTORABLE.


def check_text(value: str) -> str:
    """Refuse text with a NUL character or an unpaired surrogate (names the problem)."""
    bad = UNSTORABLE.search(value)
    if bad is not None:
        if bad.group() == "\x00":
            raise ValidationError("must not contain NUL characters (\\u0000)")
        raise ValidationError("must be valid Unicode text: it contains an unpaired surrogate "
                              f"(\\u{ord(bad.group()):04x})")
    return value


#: nesting a JSON value (a tool's schema, a response_format) may have: deeper is no real schema
MAX_JSON_DEPTH = 64


def check_json_text(value: Any, depth: int = 0) -> Any:
    """:func:`check_text` on every string and key of a JSON value, at most MAX_JSON_DEPTH deep."""
    if depth > MAX_JSON_DEPTH:
        raise ValidationError(f"nested more than {MAX_JSON_DEPTH} levels deep")
    if isinstance(value, str):
        check_text(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            check_text(k)
            check_json_text(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            check_json_text(v, depth + 1)
    return value


class JSONValue(fields.Raw):
    """Any JSON value whose text can be stored (see :func:`check_json_text`): the
    pass-through fields (``tools``, ``tool_choice``, ``response_format``) reach
    the prompt, the call row and upstreams."""

    def _deserialize(self, value, attr, data, **kwargs):
        return check_json_text(super()._deserialize(value, attr, data, **kwargs))


class String(af.String):
    """A string field that refuses NUL and lone surrogates (see :func:`check_text`)."""

    def _deserialize(self, value, attr, data, **kwargs):
        return check_text(super()._deserialize(value, attr, data, **kwargs))


class Float(af.Float):
    """A JSON number only: "0.5" and true are refused."""

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


class Boolean(af.Boolean):
    """A JSON boolean only: "yes", "true", 1 and 0 are refused."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, bool):
            raise self.make_error("invalid")
        return value


class WholeNumber(Integer):
    """A strict integer that also takes ``1.0``: JSON Schema (and so our OpenAPI
    document) calls 1.0 an integer, and JSON clients may send it; 1.5, "1" and
    true are still refused."""

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, bool):
            raise self.make_error("invalid")
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return super()._deserialize(value, attr, data, **kwargs)


def _settings():
    """This app's Settings, or None outside a request (e.g. building the OpenAPI document)."""
    return current_app.config.get("SETTINGS") if has_app_context() else None


def _check_max_tokens(data: dict[str, Any], *names: str) -> None:
    """max_tokens over MAX_TOKENS_CAP is a field error like any other (so a 400 lists it
    together with every other bad field)."""
    s = _settings()
    if s is None:
        return
    errors = {name: [f"must be <= {s.max_tokens_cap}"] for name in names
              if isinstance(data.get(name), int) and data[name] > s.max_tokens_cap}
    if errors:
        raise ValidationError(errors)


def _check_prompt_chars(chars: int) -> None:
    """The cheap length guard before any tokenising: MAX_PROMPT_CHARS over the prompt,
    or over all messages together, once the request is otherwise valid. 422
    ``prompt_too_long`` on the seed routes, OpenAI's 400 ``string_above_max_length``
    on /v1 (one rule: :func:`.context.refuse_long_prompt`)."""
    s = _settings()
    if s is not None and chars > s.max_prompt_chars:
        from .context import refuse_long_prompt

        refuse_long_prompt(chars, s.max_prompt_chars)


class _PromptLimits(Schema):
    """``max_tokens`` under its cap and ``prompt`` under MAX_PROMPT_CHARS, for the
    schemas that take a single ``prompt``."""

    @validates_schema(skip_on_field_errors=False)
    def _within_caps(self, data: dict[str, Any], **_kw: object) -> None:
        _check_max_tokens(data, "max_tokens")

    @validates_schema  # skipped when a field is invalid: those are reported first, all at once
    def _prompt_size(self, data: dict[str, Any], **_kw: object) -> None:
        _check_prompt_chars(len(data["prompt"]))


class CallModelIn(_PromptLimits):
    class Meta:
        unknown = EXCLUDE

    prompt = String(
        required=True,
        validate=Length(min=1),
        metadata={"description": "The user's message to the model.", "example": "Hello, world!"},
    )
    max_tokens = WholeNumber(
        strict=True,
        validate=Range(min=1),
        metadata={"description": "Most tokens to generate (default DEFAULT_MAX_TOKENS, capped by MAX_TOKENS_CAP)."},
    )
    temperature = Float(
        validate=Range(min=0, max=2), metadata={"description": "Sampling temperature; 0 is greedy."}
    )
    top_p = Float(
        validate=Range(min=0, max=1, min_inclusive=False),
        # apispec does not render min_inclusive=False; without this the docs would allow 0
        # (OpenAPI 3.1, which APIFlask writes, takes a number here)
        metadata={"description": "Nucleus sampling mass, in (0, 1].", "exclusiveMinimum": 0},
    )
    seed = WholeNumber(strict=True, metadata={"description": "Seed for reproducible sampling."})
    model = String(validate=Length(min=1, max=255), metadata={
        "description": "Id (or alias) of the model to call (`GET /v1/models`); default: the default model."})
    stream = Boolean(
        load_default=False,
        metadata={"description": "Stream the reply as Server-Sent Events (`chat.completion.chunk` "
                  "objects, then `data: [DONE]`) instead of one 201 JSON reply."},
    )

    @validates("prompt")
    def _not_blank(self, value: str, **_kw: object) -> None:
        if not value.strip():
            raise ValidationError("must not be blank")



class AsyncCallModelIn(CallModelIn):
    callback_url = String(
        validate=Length(min=1, max=2048),
        metadata={"description": "Where to POST the job's `/async_call_status` JSON when it ends (completed, "
                  "failed or cancelled), signed with your webhook secret (Standard Webhooks headers "
                  "`webhook-id`, `webhook-timestamp`, `webhook-signature`). `https` (and `http` outside "
                  "production); hosts resolving to loopback, private or link-local addresses are refused.",
                  "format": "uri", "example": "https://example.com/hooks/model-api",
                  # what the server can accept at all (the address rules are checked on the resolved host)
                  "pattern": r"^https?://[A-Za-z0-9.-]+(:[1-9][0-9]{0,3})?(/[!-~]*)?$"},
    )


class Usage(Schema):
    prompt_tokens = Integer(metadata={"example": 36})
    completion_tokens = Integer(metadata={"example": 9})
    total_tokens = Integer(metadata={"example": 45})


class PromptTokensDetails(Schema):
    cached_tokens = Integer(metadata={
        "example": 29, "description": "Prompt tokens reused from an earlier prompt with the same start "
        "(the chat template's system prompt, a conversation's earlier prompt), not computed again."})


class OpenAIUsage(Usage):
    prompt_tokens_details = Nested(PromptTokensDetails)


class CallModelOut(Schema):
    response = String(required=True, metadata={"description": "The model's reply."})
    id = String(metadata={"description": "Id of the stored call."})
    model = String()
    finish_reason = String(metadata={"description": "`stop` or `length`."})
    usage = Nested(Usage)


class AsyncCallOut(Schema):
    job_id = String(required=True, metadata={"example": "6fde421b-5079-4c22-ad78-e65a6fefaaaf"})


class StatusQuery(Schema):
    # checked by the route (the seed's 400 message), documented as what it must be
    job_id = String(required=True, metadata={"example": "6fde421b-5079-4c22-ad78-e65a6fefaaaf", "format": "uuid"})


class CancelIn(Schema):
    class Meta:
        unknown = EXCLUDE

    job_id = String(required=True, metadata={"example": "6fde421b-5079-4c22-ad78-e65a6fefaaaf", "format": "uuid"})


class WebhookStatusOut(Schema):
    state = String(required=True, metadata={
        "description": "`waiting` (the job has not ended), `pending` (to be attempted, again), `delivered` "
        "(your endpoint answered 2xx) or `failed` (WEBHOOK_MAX_ATTEMPTS spent, or the URL refused)."})
    attempts = Integer(required=True, metadata={"description": "Delivery attempts made so far."})
    last_status = Integer(allow_none=True, required=True, metadata={
        "description": "HTTP status of the last attempt; null if it got no answer (or none was made)."})
    last_error = String(metadata={"description": "Why the last attempt failed, if it did."})


class StatusOut(Schema):
    job_id = String()
    job_status = String(
        required=True,
        metadata={"description": "`processing` (queued or running), `completed`, `failed` or `cancelled`."},
    )
    state = String(metadata={"description": "`queued`, `running`, `completed`, `failed` or `cancelled`."})
    response = String(allow_none=True, required=True)
    error = String(allow_none=True)
    usage = Nested(Usage, allow_none=True)
    cancel_requested = Boolean(
        metadata={"description": "Present (true) while a running job is asked to stop and has not yet."}
    )
    created_at = String()
    finished_at = String(allow_none=True)
    webhook = Nested(WebhookStatusOut, metadata={
        "description": "Present when the job was submitted with a `callback_url`: its delivery so far."})


class JobsQuery(Schema):
    class Meta:
        unknown = EXCLUDE

    state = String(validate=OneOf(["processing", "queued", "running", "completed", "failed", "cancelled"]),
                   metadata={"description": "Only jobs in this state: the seed's `processing` (queued or "
                             "running) or a detailed state."})
    limit = Integer(load_default=20, validate=Range(min=1, max=100),
                    metadata={"description": "Jobs per page (1-100)."})
    before = String(metadata={"description": "Cursor: the `next_before` of the previous page.", "format": "uuid"})


class JobOut(StatusOut):
    """One job of ``GET /jobs``: as ``/async_call_status`` shows it."""


class JobsOut(Schema):
    jobs = List(Nested(JobOut), required=True, metadata={
        "description": "Your async jobs, newest first, each as `/async_call_status` shows it."})
    next_before = String(allow_none=True, metadata={"description": "Pass as `before` for the next page; null at the end."})


_COMPONENT = {
    "type": "object",
    "description": "One dependency's state. `status` is `ready` or what is wrong (`error`, `loading`, "
    "`not loaded`); `latency_ms` is how long its check took; `error` says why it failed. The model "
    "adds `name`, `quantisation` and `context_size`; the broker check (when configured) adds its own fields.",
    "required": ["status"],
    "properties": {
        "status": {"type": "string", "example": "ready"},
        "latency_ms": {"type": "number", "example": 0.42},
        "error": {"type": "string"},
    },
    "additionalProperties": True,
}


class ReadyOut(Schema):
    status = String(required=True, metadata={"description": "`ready` or `not ready`.", "example": "ready"})
    components = Dict(
        required=True,
        metadata={
            "description": "`database`, `model` and, when a broker is configured, `broker`.",
            "additionalProperties": _COMPONENT,
            "example": {
                "database": {"status": "ready", "latency_ms": 0.8},
                "model": {"status": "ready", "latency_ms": 0.3, "name": "SmolLM2-135M-Instruct.Q4_1",
                          "quantisation": "Q4_1", "context_size": 2048},
            },
        },
    )


class ErrorBody(Schema):
    code = String(required=True, metadata={"description": "Machine-readable error code.", "example": "quota_exceeded"})
    message = String(required=True, metadata={"description": "What went wrong, for humans."})
    details = Dict(metadata={"description": "Per-field problems or numbers behind the error, when any."})


class ErrorOut(Schema):
    """The one error shape of every 4xx/5xx response."""

    error = Nested(ErrorBody, required=True)


# --- OpenAI-compatible API (/v1) ------------------------------------------------------


class StopField(fields.Field):
    """OpenAI's ``stop``: a string or a list of up to 4 strings (null = none); loads as a list."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> list[str]:
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ValidationError("must be a non-empty string or a list of non-empty strings")
        if len(value) > 4:
            raise ValidationError("at most 4 stop sequences")
        return [check_text(v) for v in value]


class ContentField(fields.Field):
    """A message's ``content``: a string, or a list of ``{"type": "text", "text": ...}`` parts
    (joined); other part types (images, audio) are refused since the model reads text only."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, str):
            return check_text(value)
        if isinstance(value, list):
            texts = []
            for part in value:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValidationError("only text content parts ({\"type\": \"text\", \"text\": ...}) are supported")
                texts.append(check_text(part["text"]))
            return "".join(texts)
        raise ValidationError("must be a string or a list of text parts")


class MessageIn(Schema):
    class Meta:
        unknown = EXCLUDE

    role = String(required=True, validate=OneOf(["system", "developer", "user", "assistant", "tool"]))
    # null or absent (an assistant turn that only called tools) is "no text": read as ""
    content = ContentField(allow_none=True, metadata={
        "description": "Text, or a list of text parts.",
        # a custom field: say in the document what _deserialize accepts (schemathesis checks both agree)
        "oneOf": [
            {"type": "string"},
            {"type": "null"},
            {"type": "array", "items": {
                "type": "object", "required": ["type", "text"],
                "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}}},
        ],
    })
    name = String()
    # an assistant turn's calls, and a tool turn's answer to one (engine/tools.py renders them)
    tool_calls = List(Nested(lambda: ToolCallIn()), validate=Length(max=64), metadata={
        "description": "An assistant turn's tool calls, as a chat completion returned them."})
    tool_call_id = String(validate=Length(max=256), metadata={
        "description": "On a `tool` turn: the id of the call it answers."})

    @post_load
    def _null_content_is_empty(self, data: dict[str, Any], **_kw: object) -> dict[str, Any]:
        if data.get("content") is None:  # marshmallow skips the field's own handling of null
            data["content"] = ""
        return data


class FunctionCallIn(Schema):
    class Meta:
        unknown = EXCLUDE

    name = String(required=True, validate=Length(min=1, max=64))
    arguments = String(required=True, validate=Length(max=100_000), metadata={
        "description": "The arguments, as JSON text."})


class ToolCallIn(Schema):
    class Meta:
        unknown = EXCLUDE

    id = String(required=True, validate=Length(max=256))
    type = String(load_default="function", validate=OneOf(["function"]))
    function = Nested(FunctionCallIn, required=True)


class StreamOptions(Schema):
    class Meta:
        unknown = EXCLUDE

    include_usage = Boolean(load_default=False)


class _OpenAISampling(Schema):
    class Meta:
        unknown = EXCLUDE  # OpenAI clients send many optional fields this model has no use for

    model = String(allow_none=True, metadata={
        "description": "Id (or alias) of the model (`GET /v1/models`); null: the default model. Without "
        "MODELS_FILE the one model answers to any name."})
    max_tokens = WholeNumber(strict=True, allow_none=True, validate=Range(min=1),
                             metadata={"description": "Most tokens to generate (capped by MAX_TOKENS_CAP)."})
    temperature = Float(allow_none=True, validate=Range(min=0, max=2))
    top_p = Float(allow_none=True, validate=Range(min=0, max=1, min_inclusive=False),
                  metadata={"exclusiveMinimum": 0})  # as CallModelIn.top_p: apispec drops min_inclusive
    seed = WholeNumber(strict=True, allow_none=True)
    stop = StopField(allow_none=True, metadata={
        "description": "A string or up to 4 strings.",
        "oneOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "maxItems": 4, "items": {"type": "string", "minLength": 1}},
            {"type": "null"},
        ],
    })
    # n > 1 is refused by the route as an unsupported parameter (api/protocol.py)
    n = WholeNumber(strict=True, allow_none=True, validate=Range(min=1),
                    metadata={"description": "Only 1 (one choice per call).", "maximum": 1})
    stream = Boolean(allow_none=True, load_default=False)
    stream_options = Nested(StreamOptions, allow_none=True)


class MessageList(List):
    """``messages``: at most MAX_MESSAGES, counted before any message is read."""

    def _deserialize(self, value, attr, data, **kwargs):
        s = _settings()
        if s is not None and isinstance(value, list) and len(value) > s.max_messages:
            raise ValidationError(f"at most {s.max_messages} messages (got {len(value)})")
        return super()._deserialize(value, attr, data, **kwargs)


class ChatCompletionIn(_OpenAISampling):
    messages = MessageList(Nested(MessageIn), required=True, validate=Length(min=1),
                           metadata={"description": "The conversation: at most MAX_MESSAGES messages, "
                                     "MAX_PROMPT_CHARS characters of content in all."})
    # checked by the route (engine/grammar.py: 400 naming the part it cannot enforce)
    response_format = JSONValue(allow_none=True, metadata={
        "description": "`{\"type\": \"json_object\"}` or `{\"type\": \"json_schema\", \"json_schema\": "
        "{\"name\": ..., \"schema\": {...}}}`: on local models sampling is constrained by a grammar, so "
        "the reply parses (and matches the schema); passed through to remote upstreams. `schema` may be any "
        "JSON Schema whose keywords the grammar can enforce (README \"Structured output\"); the document "
        "shows the simplest ones.",
        "oneOf": [
            {"type": "null"},
            {"type": "object", "required": ["type"],
             "properties": {"type": {"type": "string", "enum": ["text", "json_object"]}}},
            {"type": "object", "required": ["type", "json_schema"], "properties": {
                "type": {"type": "string", "enum": ["json_schema"]},
                "json_schema": {"type": "object", "required": ["schema"], "properties": {
                    "name": {"type": "string"},
                    "strict": {"type": ["boolean", "null"]},
                    "schema": {"type": "object", "required": ["type"], "additionalProperties": False,
                               "properties": {"type": {"type": "string", "enum": [
                                   "object", "array", "string", "integer", "number", "boolean", "null"]}}},
                }},
            }},
        ],
    })
    max_completion_tokens = WholeNumber(strict=True, allow_none=True, validate=Range(min=1),
                                        metadata={"description": "Same as max_tokens (wins if both are given)."})
    # checked by the route (engine/tools.py: 400 naming the part that is wrong or cannot be enforced)
    # the document shows the simplest tools (as for response_format); the route accepts up to
    # 128, with any `parameters` schema the grammar can enforce (README "Tool calls")
    tools = List(JSONValue(metadata={
        "type": "object", "required": ["type", "function"], "additionalProperties": False, "properties": {
            "type": {"type": "string", "enum": ["function"]},
            "function": {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": 64},
                "description": {"type": "string"},
                "parameters": {"type": "object", "required": ["type"], "additionalProperties": False,
                               "properties": {"type": {"type": "string", "enum": ["object"]}}}}}}}),
        allow_none=True, validate=Length(max=128), metadata={
            "maxItems": 1,
            "description": "Functions the model may call (up to 128 `{\"type\": \"function\", \"function\": "
            "{\"name\", \"description\", \"parameters\"}}`, names unique). On local models a grammar makes "
            "every call name an offered function with arguments valid for its `parameters` JSON Schema; passed "
            "through to remote upstreams."})
    tool_choice = JSONValue(allow_none=True, metadata={
        "description": "`\"none\"`, `\"auto\"` (default with tools: text or a call), `\"required\"`, or "
        "`{\"type\": \"function\", \"function\": {\"name\": <one of tools>}}` (a call to that one).",
        "oneOf": [{"type": "null"}, {"type": "string", "enum": ["none", "auto", "required"]}]})

    @validates_schema(skip_on_field_errors=False)
    def _within_caps(self, data: dict[str, Any], **_kw: object) -> None:
        _check_max_tokens(data, "max_tokens", "max_completion_tokens")

    @validates_schema  # skipped when a field is invalid: those are reported first, all at once
    def _prompt_size(self, data: dict[str, Any], **_kw: object) -> None:
        _check_prompt_chars(sum(len(m["content"]) + sum(len(c["function"]["arguments"]) for c in m.get("tool_calls", ()))
                                for m in data["messages"]))


class CompletionIn(_OpenAISampling, _PromptLimits):
    prompt = String(required=True, validate=Length(min=1),
                    metadata={"description": "Raw text the model continues (no chat template)."})


class OpenAIErrorBody(Schema):
    message = String(required=True, metadata={"description": "What went wrong, for humans."})
    type = String(required=True, metadata={"description": "OpenAI's error type.", "example": "rate_limit_error"})
    param = String(allow_none=True, required=True, metadata={"description": "The offending field, if one."})
    code = String(allow_none=True, required=True, metadata={"example": "quota_exceeded"})


class OpenAIErrorOut(Schema):
    """The error shape of ``/v1/*`` (OpenAI's, so its SDKs raise the right exceptions)."""

    error = Nested(OpenAIErrorBody, required=True)


class CompletionOut(Schema):
    """``chat.completion`` or ``text_completion`` (documentation only: routes build the dict)."""

    id = String(required=True, metadata={"example": "chatcmpl-0b6f5c8e2f1d4a519a431d2e3f4a5b6c"})
    object = String(required=True, metadata={"example": "chat.completion"})
    created = Integer(required=True)
    model = String(required=True)
    choices = List(Dict(), required=True, metadata={
        "description": "One choice: `message` (chat) or `text` (completion), and `finish_reason`."})
    usage = Nested(OpenAIUsage, required=True)
    system_fingerprint = String(allow_none=True)


class ModelOut(Schema):
    id = String(required=True, metadata={"example": "SmolLM2-135M-Instruct.Q4_1"})
    object = String(required=True, metadata={"example": "model"})
    created = Integer(required=True)
    owned_by = String(required=True)
    context_length = Integer(metadata={"description": "The model's context window (tokens).", "example": 2048})
    backend = String(metadata={"description": "`batching`, `llama` or `openai` (a remote upstream)."})
    aliases = List(String(), metadata={"description": "Other names that reach this model."})


class ModelListOut(Schema):
    object = String(required=True, metadata={"example": "list"})
    data = List(Nested(ModelOut), required=True)


__all__ = ["ChatCompletionIn", "CompletionOut", "ModelListOut", "OpenAIErrorOut", "CompletionIn", "CancelIn", "AsyncCallOut", "CallModelIn", "CallModelOut", "ErrorOut", "ReadyOut", "StatusOut", "StatusQuery", "List"]


class HistoryQuery(Schema):
    class Meta:
        unknown = EXCLUDE

    limit = Integer(load_default=20, validate=Range(min=1, max=100),
                    metadata={"description": "Calls per page (1-100)."})
    # checked by the route (a 400 naming the field), documented as what it must be
    before = String(metadata={"description": "Cursor: the `next_before` of the previous page.", "format": "uuid"})


class CallOut(Schema):
    id = String(required=True)
    kind = String(metadata={"description": "`sync`, `async`, `stream`, `chat` or `completion`."})
    state = String(metadata={"description": "`queued`, `running`, `completed`, `failed` or `cancelled`."})
    prompt = String()
    messages = List(Dict(), allow_none=True)
    response = String(allow_none=True)
    error = String(allow_none=True)
    finish_reason = String(allow_none=True)
    model = String(allow_none=True, metadata={"description": "The name the model reported."})
    model_id = String(allow_none=True, metadata={"description": "The served model's id the call was routed to."})
    usage = Dict(allow_none=True)
    created_at = String()
    finished_at = String(allow_none=True)


class HistoryOut(Schema):
    calls = List(Nested(CallOut), required=True)
    next_before = String(allow_none=True, metadata={"description": "Pass as `before` for the next page; null at the end."})
