"""Request/response schemas: they validate input *and* generate the OpenAPI document."""

from __future__ import annotations

from apiflask import Schema
from typing import Any

from apiflask.fields import Boolean, Dict, Float, Integer, List, Nested, String
from apiflask.validators import Length, OneOf, Range
from marshmallow import EXCLUDE, ValidationError, fields, validates


class CallModelIn(Schema):
    class Meta:
        unknown = EXCLUDE

    prompt = String(
        required=True,
        validate=Length(min=1),
        metadata={"description": "The user's message to the model.", "example": "Hello, world!"},
    )
    max_tokens = Integer(
        strict=True,
        validate=Range(min=1),
        metadata={"description": "Most tokens to generate (default DEFAULT_MAX_TOKENS, capped by MAX_TOKENS_CAP)."},
    )
    temperature = Float(
        validate=Range(min=0, max=2), metadata={"description": "Sampling temperature; 0 is greedy."}
    )
    top_p = Float(
        validate=Range(min=0, max=1, min_inclusive=False), metadata={"description": "Nucleus sampling mass."}
    )
    seed = Integer(strict=True, metadata={"description": "Seed for reproducible sampling."})
    stream = Boolean(
        load_default=False,
        metadata={"description": "Stream the reply as Server-Sent Events (`chat.completion.chunk` "
                  "objects, then `data: [DONE]`) instead of one 201 JSON reply."},
    )

    @validates("prompt")
    def _not_blank(self, value: str, **_kw: object) -> None:
        if not value.strip():
            raise ValidationError("must not be blank")


class Usage(Schema):
    prompt_tokens = Integer()
    completion_tokens = Integer()
    total_tokens = Integer()


class CallModelOut(Schema):
    response = String(required=True, metadata={"description": "The model's reply."})
    id = String(metadata={"description": "Id of the stored call."})
    model = String()
    finish_reason = String(metadata={"description": "`stop` or `length`."})
    usage = Dict()


class AsyncCallOut(Schema):
    job_id = String(required=True, metadata={"example": "6fde421b-5079-4c22-ad78-e65a6fefaaaf"})


class StatusQuery(Schema):
    job_id = String(required=True, metadata={"example": "6fde421b-5079-4c22-ad78-e65a6fefaaaf"})


class CancelIn(Schema):
    class Meta:
        unknown = EXCLUDE

    job_id = String(required=True, metadata={"example": "6fde421b-5079-4c22-ad78-e65a6fefaaaf"})


class StatusOut(Schema):
    job_id = String()
    job_status = String(
        required=True,
        metadata={"description": "`processing` (queued or running), `completed`, `failed` or `cancelled`."},
    )
    state = String(metadata={"description": "`queued`, `running`, `completed`, `failed` or `cancelled`."})
    response = String(allow_none=True, required=True)
    error = String(allow_none=True)
    usage = Dict(allow_none=True)
    cancel_requested = Boolean(
        metadata={"description": "Present (true) while a running job is asked to stop and has not yet."}
    )
    created_at = String()
    finished_at = String(allow_none=True)


class ReadyOut(Schema):
    status = String()
    components = Dict()


class ErrorBody(Schema):
    code = String(required=True)
    message = String(required=True)
    details = Dict()


class ErrorOut(Schema):
    error = Dict(required=True)


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
        return value


class ContentField(fields.Field):
    """A message's ``content``: a string, or a list of ``{"type": "text", "text": ...}`` parts
    (joined); other part types (images, audio) are refused since the model reads text only."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            texts = []
            for part in value:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValidationError("only text content parts ({\"type\": \"text\", \"text\": ...}) are supported")
                texts.append(part["text"])
            return "".join(texts)
        raise ValidationError("must be a string or a list of text parts")


class MessageIn(Schema):
    class Meta:
        unknown = EXCLUDE

    role = String(required=True, validate=OneOf(["system", "developer", "user", "assistant"]))
    content = ContentField(required=True, metadata={"description": "Text, or a list of text parts."})
    name = String()


class StreamOptions(Schema):
    class Meta:
        unknown = EXCLUDE

    include_usage = Boolean(load_default=False)


class _OpenAISampling(Schema):
    class Meta:
        unknown = EXCLUDE  # OpenAI clients send many optional fields this model has no use for

    model = String(allow_none=True, metadata={
        "description": "Accepted and ignored: this service serves one model (see GET /v1/models)."})
    max_tokens = Integer(strict=True, allow_none=True, validate=Range(min=1),
                         metadata={"description": "Most tokens to generate (capped by MAX_TOKENS_CAP)."})
    temperature = Float(allow_none=True, validate=Range(min=0, max=2))
    top_p = Float(allow_none=True, validate=Range(min=0, max=1, min_inclusive=False))
    seed = Integer(strict=True, allow_none=True)
    stop = StopField(allow_none=True, metadata={"description": "A string or up to 4 strings."})
    n = Integer(strict=True, allow_none=True, validate=OneOf([1], error="only n=1 is supported"))
    stream = Boolean(allow_none=True, load_default=False)
    stream_options = Nested(StreamOptions, allow_none=True)


class ChatCompletionIn(_OpenAISampling):
    messages = List(Nested(MessageIn), required=True, validate=Length(min=1))
    max_completion_tokens = Integer(strict=True, allow_none=True, validate=Range(min=1),
                                    metadata={"description": "Same as max_tokens (wins if both are given)."})


class CompletionIn(_OpenAISampling):
    prompt = String(required=True, validate=Length(min=1),
                    metadata={"description": "Raw text the model continues (no chat template)."})


__all__ = ["ChatCompletionIn", "CompletionIn", "CancelIn", "AsyncCallOut", "CallModelIn", "CallModelOut", "ErrorOut", "ReadyOut", "StatusOut", "StatusQuery", "List"]


class HistoryQuery(Schema):
    class Meta:
        unknown = EXCLUDE

    limit = Integer(load_default=20, validate=Range(min=1, max=100),
                    metadata={"description": "Calls per page (1-100)."})
    before = String(metadata={"description": "Cursor: the `next_before` of the previous page."})


class CallOut(Schema):
    id = String(required=True)
    kind = String(metadata={"description": "`sync`, `async`, `stream`, `chat` or `completion`."})
    state = String(metadata={"description": "`queued`, `running`, `completed`, `failed` or `cancelled`."})
    prompt = String()
    messages = List(Dict(), allow_none=True)
    response = String(allow_none=True)
    error = String(allow_none=True)
    finish_reason = String(allow_none=True)
    model = String(allow_none=True)
    usage = Dict(allow_none=True)
    created_at = String()
    finished_at = String(allow_none=True)


class HistoryOut(Schema):
    calls = List(Nested(CallOut), required=True)
    next_before = String(allow_none=True, metadata={"description": "Pass as `before` for the next page; null at the end."})
