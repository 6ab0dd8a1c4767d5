"""Request/response schemas: they validate input *and* generate the OpenAPI document."""

from __future__ import annotations

from apiflask import Schema
from apiflask.fields import Boolean, Dict, Float, Integer, List, String
from apiflask.validators import Length, Range
from marshmallow import EXCLUDE, ValidationError, validates


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


__all__ = ["AsyncCallOut", "CancelIn", "CallModelIn", "CallModelOut", "ErrorOut", "ReadyOut", "StatusOut", "StatusQuery", "List"]
