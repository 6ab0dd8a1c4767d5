"""The seed's model endpoints: /call_model, /async_call_model, /async_call_status.

Routes parse, call a service, and shape the reply; nothing else.
"""

from __future__ import annotations

import dataclasses
import uuid

from apiflask import APIBlueprint

from ..db import as_utc
from ..engine.base import GenerationRequest
from ..models import CallKind, CallStatus
from ..services.history import job_view as _job_view
from ..services.jobs import JobNotFound
from . import streaming
from .context import intent, model_entry, note_usage, runtime, sampling_params
from .docs import RATE_LIMIT_HEADERS, SSE_EVENT_SCHEMA, error_responses
from .errors import api_error, rate_headers
from .idempotency import idempotent
from .protocol import usage
from .schemas import (
    AsyncCallModelIn,
    AsyncCallOut,
    CallModelIn,
    CallModelOut,
    CancelIn,
    ErrorOut,
    HistoryOut,
    HistoryQuery,
    JobsOut,
    JobsQuery,
    StatusOut,
    StatusQuery,
)
from .security import auth, current_principal

bp = APIBlueprint("model", __name__, tag="Model")

#: what a streamed reply looks like on the wire (documented for the 200 of /call_model)
SSE_EXAMPLE = (
    'data: {"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
    'data: {"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hello!"}}]}\n\n'
    'data: {"object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":31,"completion_tokens":2,'
    '"total_tokens":33}}\n\n'
    "data: [DONE]\n\n"
)

RATE_HEADERS = RATE_LIMIT_HEADERS  # documented on every success and on 429

_MODEL_ERRORS = (400, 401, 403, 404, 413, 422, 429, 500, 502, 503, 504)
_ERRORS = error_responses(*_MODEL_ERRORS, d404="No model of that id or alias (`model_not_found`; nothing charged)")  # the errors every model-call route can answer


def _stream_reply(call) -> tuple[dict, int]:
    """A repeated streamed /call_model with an Idempotency-Key: the stream's text as the 201 body."""
    return {"response": call.response or "", "id": str(call.id), "model": call.model,
            "finish_reason": call.finish_reason, "usage": usage(call.prompt_tokens, call.completion_tokens or 0)}, 201


@bp.post("/call_model")
@bp.auth_required(auth)
@bp.input(CallModelIn, location="json", example={"prompt": "Hello, world!"})
@bp.output(CallModelOut, status_code=201, description="The model's reply (stored)", example={
               "response": "Hello! How can I help you today?", "id": "0b6f5c8e-2f1d-4a51-9a43-1d2e3f4a5b6c",
               "model": "SmolLM2-135M-Instruct.Q4_1", "finish_reason": "stop",
               "usage": {"prompt_tokens": 31, "completion_tokens": 9, "total_tokens": 40}})
@bp.doc(summary="Call the model", responses={
    **_ERRORS, 201: {"headers": RATE_HEADERS},
    200: {"description": "With `stream: true`: Server-Sent Events (`chat.completion.chunk` objects, usage "
          "in the last one, then `data: [DONE]`). An error after the stream began arrives as a "
          "`data: {\"error\": ...}` event.",
          "content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA, "example": SSE_EXAMPLE}},
          "headers": RATE_HEADERS}})
@idempotent(stream_reply=_stream_reply)
def call_model(json_data: dict):
    """Generate a reply to ``prompt`` and wait for it. Uses one unit of quota."""
    model = model_entry(json_data.get("model"))
    request = GenerationRequest.single_prompt(json_data["prompt"], sampling_params(json_data, model))
    if json_data.get("stream"):
        # the same SSE chunks as /v1/chat/completions, usage always in the last one
        return streaming.start(intent(request, CallKind.STREAM, model), chat=True, include_usage=True)
    outcome = runtime().calls.run(intent(request, CallKind.SYNC, model))
    c = outcome.completion
    note_usage(c)
    body = {
        "response": c.text,
        "id": str(outcome.call_id),
        "model": c.model,
        "finish_reason": c.finish_reason,
        "usage": usage(c.prompt_tokens, c.completion_tokens),
    }
    return body, 201, rate_headers(outcome.quota, outcome.rates)


@bp.post("/async_call_model")
@bp.auth_required(auth)
@bp.input(AsyncCallModelIn, location="json", example={"prompt": "Hello, world!"})
@bp.output(AsyncCallOut, status_code=200, description="The job was stored and queued",
           example={"job_id": "6fde421b-5079-4c22-ad78-e65a6fefaaaf"},
           # tells clients (and schemathesis's stateful phase) where the job id goes next
           links={"GetJobStatus": {"operationRef": "#/paths/~1async_call_status/get",
                                   "parameters": {"job_id": "$response.body#/job_id"}},
                  "CancelJob": {"operationRef": "#/paths/~1async_call_cancel/post",
                                "requestBody": {"job_id": "$response.body#/job_id"}}})
@bp.doc(summary="Call the model asynchronously",
        responses={**_ERRORS, 200: {"headers": RATE_HEADERS}})
@idempotent
def async_call_model(json_data: dict):
    """Queue a generation and return its ``job_id`` at once; poll ``/async_call_status``, list
    ``/jobs``, or give a ``callback_url`` to be called when it ends.
    Uses one unit of quota (refunded if the job fails through the server's fault)."""
    model = model_entry(json_data.get("model"))
    request = GenerationRequest.single_prompt(json_data["prompt"], sampling_params(json_data, model))
    rt = runtime()
    callback = json_data.get("callback_url")
    if callback is not None:
        rt.webhooks.check(callback)  # before anything is charged: CallbackRefused is a 400
    call = dataclasses.replace(intent(request, CallKind.ASYNC, model), callback_url=callback)
    outcome = rt.jobs.submit(call)
    return {"job_id": str(outcome.call_id)}, 200, rate_headers(outcome.quota, outcome.rates)


def _parse_job_id(raw: str, field: str = "job_id") -> uuid.UUID:
    try:
        return uuid.UUID(raw.strip())
    except (ValueError, AttributeError):
        raise api_error(400, f"{field} must be a UUID", code="invalid_request",
                        details={field: ["not a valid UUID"]}) from None


def _iso(value) -> str | None:
    """UTC with an explicit offset, whichever database stored it (SQLite drops the zone)."""
    return as_utc(value).isoformat() if value is not None else None


def job_view(call, webhooks: dict | None = None) -> dict:
    """The job as ``/async_call_status`` shows it (``services.history.job_view``, which
    its webhook also sends) plus, if it has one, where its webhook stands
    (``webhooks``: already read for a page of jobs)."""
    out = _job_view(call)
    if webhooks is None:
        webhooks = runtime().webhooks.statuses_of([call.id])
    if call.id in webhooks:
        out["webhook"] = webhooks[call.id]
    return out


@bp.get("/async_call_status")
@bp.auth_required(auth)
@bp.input(StatusQuery, location="query", example={"job_id": "6fde421b-5079-4c22-ad78-e65a6fefaaaf"})
@bp.output(StatusOut, status_code=200, description="The job's state and, once completed, its response",
           examples={
               "processing": {"value": {"job_id": "6fde421b-5079-4c22-ad78-e65a6fefaaaf", "job_status": "processing",
                                        "state": "queued", "response": None,
                                        "created_at": "2025-01-01T12:00:00+00:00", "finished_at": None}},
               "completed": {"value": {"job_id": "6fde421b-5079-4c22-ad78-e65a6fefaaaf", "job_status": "completed",
                                       "state": "completed", "response": "Hello! How can I help you today?",
                                       "created_at": "2025-01-01T12:00:00+00:00",
                                       "finished_at": "2025-01-01T12:00:01+00:00",
                                       "usage": {"prompt_tokens": 31, "completion_tokens": 9, "total_tokens": 40}}},
           })
@bp.doc(summary="Status of an async job", responses=error_responses(400, 401, 404, d400="job_id missing or not a UUID"))
def async_call_status(query_data: dict):
    """``job_status`` keeps the seed's values; ``state`` gives the detailed one."""
    job = runtime().history.job(_parse_job_id(query_data["job_id"]), current_principal().id)
    if job is None:
        raise JobNotFound(query_data["job_id"])
    return job_view(job)


@bp.post("/async_call_cancel")
@bp.auth_required(auth)
@bp.input(CancelIn, location="json", example={"job_id": "6fde421b-5079-4c22-ad78-e65a6fefaaaf"})
@bp.output(StatusOut, status_code=200, description="The job was queued and is now cancelled (unit refunded)")
@bp.doc(summary="Cancel an async job", responses={
    202: {"description": "The job is running; it stops at its next token (state turns `cancelled`; unit kept)",
          "content": {"application/json": {"schema": StatusOut}}},
    **error_responses(400, 401, 404, 409, d400="job_id missing or not a UUID",
                      d409="The job already finished (completed, failed or cancelled), or (`request_in_progress`) "
                      "a request with this Idempotency-Key is still running")})
@idempotent
def async_call_cancel(json_data: dict):
    """Cancel a queued job (refunded) or stop a running one, wherever it runs."""
    job_id = _parse_job_id(json_data["job_id"])
    rt, user_id = runtime(), current_principal().id
    state = rt.jobs.cancel(job_id, user_id)
    return job_view(rt.history.job(job_id, user_id)), (200 if state == CallStatus.CANCELLED.value else 202)


__all__ = ["bp", "ErrorOut"]


def call_view(call) -> dict:
    view = {
        "id": str(call.id),
        "kind": call.kind,
        "state": call.status,
        "prompt": call.prompt,
        "messages": call.messages,
        "response": call.response,
        "error": call.error,
        "finish_reason": call.finish_reason,
        "model": call.model,
        "model_id": call.model_id,
        "usage": None,
        "created_at": _iso(call.created_at),
        "finished_at": _iso(call.finished_at),
    }
    if call.completion_tokens is not None:
        view["usage"] = usage(call.prompt_tokens, call.completion_tokens)
    return view


@bp.get("/calls")
@bp.auth_required(auth)
@bp.input(HistoryQuery, location="query")
@bp.output(HistoryOut, status_code=200, description="Your calls, newest first")
@bp.doc(summary="Your call history",
        responses=error_responses(400, 401, d400="Bad limit, or a cursor that is not a UUID"))
def call_history(query_data: dict):
    """Every model call you made (sync, async, streamed, /v1), with prompt and response. Uses no quota."""
    before = _parse_job_id(query_data["before"]) if query_data.get("before") else None
    limit = query_data["limit"]
    page = [call_view(c) for c in runtime().history.page(current_principal().id, limit, before)]
    return {"calls": page, "next_before": page[-1]["id"] if len(page) == limit else None}


@bp.get("/jobs")
@bp.auth_required(auth)
@bp.input(JobsQuery, location="query")
@bp.output(JobsOut, status_code=200, description="Your async jobs, newest first")
@bp.doc(summary="Your async jobs",
        responses=error_responses(400, 401, d400="Bad state or limit, or a cursor that is not a UUID"))
def list_jobs(query_data: dict):
    """Your async jobs (each as ``/async_call_status`` shows it), newest first, ``state`` to filter,
    ``before`` to page: how a client that lost a job id finds it again. Uses no quota."""
    before = _parse_job_id(query_data["before"], "before") if query_data.get("before") else None
    limit = query_data["limit"]
    rt = runtime()
    jobs = rt.history.jobs(current_principal().id, limit, before, query_data.get("state"))
    webhooks = rt.webhooks.statuses_of([j.id for j in jobs])
    page = [job_view(j, webhooks) for j in jobs]
    return {"jobs": page, "next_before": page[-1]["job_id"] if len(page) == limit else None}
