"""Request/response schemas: they validate input *and* generate the OpenAPI document."""

from __future__ import annotations

from apiflask import Schema
from apiflask.fields import Dict, Float, Integer, List, Nested, String
from apiflask.validators import Length, Range
from marshmallow import EXCLUDE, ValidationError, validates


class WholeNumber(Integer):
    """A strict integer that also takes ``1.0``: JSON Schema (and so our OpenAPI
    document) calls 1.0 an integer, and JSON clients may send it; 1.5, "1" and
    true are still refused."""

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return super()._deserialize(value, attr, data, **kwargs)


class CallModelIn(Schema):
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

    @validates("prompt")
    def _not_blank(self, value: str, **_kw: object) -> None:
        if not value.strip():
            raise ValidationError("must not be blank")


class Usage(Schema):
    prompt_tokens = Integer(metadata={"example": 36})
    completion_tokens = Integer(metadata={"example": 9})
    total_tokens = Integer(metadata={"example": 45})


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
    created_at = String()
    finished_at = String(allow_none=True)


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


__all__ = ["AsyncCallOut", "CallModelIn", "CallModelOut", "ErrorOut", "ReadyOut", "StatusOut", "StatusQuery", "List"]
