"""One error helper (:func:`api_error`) for every 4xx/5xx response, rendered in
one place. The shape follows the dialect the route's blueprint declares:

    {"error": {"code": "quota_exceeded", "message": "...", "details": {...}}}     # seed routes
    {"error": {"message": "...", "type": "rate_limit_error", "param": null,
               "code": "quota_exceeded"}}                                        # /v1 (OpenAI's)

Status codes are the same on both.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from apiflask import APIFlask, HTTPError
from flask import Blueprint, has_request_context, jsonify, request
from sqlalchemy import exc as sa_exc

from ..engine.base import ContextOverflow, EngineBusy, EngineError, UpstreamError, UpstreamTimeout
from ..engine.registry import ModelUnavailable, UnknownModel
from ..services.access import ModelNotAllowed
from ..services.admin import Conflict, NotFound
from ..services.auth import UserError
from ..services.idempotency import KeyReused, RequestInProgress
from ..services.jobs import JobFinished, JobNotFound, QueueUnavailable
from ..services.ledger import database_unavailable
from ..services.limits import BudgetExceeded, RateLimited, RateState
from ..services.quota import QuotaExceeded, QuotaState
from ..services.webhooks import CallbackRefused

log = logging.getLogger(__name__)

# status -> default machine-readable code
CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "unprocessable",
    429: "quota_exceeded",
    500: "internal_error",
    502: "bad_gateway",
    503: "unavailable",
    504: "gateway_timeout",
}


def api_error(
    status: int,
    message: str,
    *,
    code: str | None = None,
    details: Any = None,
    headers: dict[str, str] | None = None,
    param: str | None = None,
) -> HTTPError:
    """Build the exception routes raise; the processor below renders it.
    ``param``: the offending request field (OpenAI's ``error.param`` on /v1)."""
    extra = {"code": code or CODES.get(status), **({"param": param} if param else {})}
    return HTTPError(status, message, detail=details, headers=headers, extra_data=extra)


# status -> OpenAI error "type" (what its SDKs and docs use)
OPENAI_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}

#: blueprint name -> (URL prefix, dialect) for blueprints whose clients expect
#: another error shape than ours (see :func:`declare_dialect`)
_DIALECTS: dict[str, tuple[str, str]] = {}


def declare_dialect(bp: Blueprint, dialect: str) -> None:
    """Errors on ``bp``'s routes (and on unknown URLs under its prefix) take
    ``dialect``'s shape: ``"openai"`` is the one other than ours."""
    _DIALECTS[bp.name] = ((bp.url_prefix or "").rstrip("/"), dialect)


def request_dialect() -> str:
    """The error dialect of the current request: its blueprint's, else the one
    declared for its URL prefix (a 404 matches no blueprint), else ours."""
    if not has_request_context():
        return "ours"
    declared = _DIALECTS.get(request.blueprint or "")
    if declared is not None:
        return declared[1]
    for prefix, dialect in _DIALECTS.values():
        if prefix and (request.path == prefix or request.path.startswith(prefix + "/")):
            return dialect
    return "ours"


def error_body(status: int, code: str, message: str, details: Any = None, *, dialect: str | None = None,
               param: str | None = None) -> dict:
    """The JSON body of an error (also sent as an in-stream SSE event once a stream
    has begun); ``dialect`` defaults to the current request's."""
    if (dialect or request_dialect()) == "openai":
        etype = OPENAI_TYPES.get(status) or ("server_error" if status >= 500 else "invalid_request_error")
        if code == "insufficient_quota":
            etype = "insufficient_quota"  # as OpenAI types it
        if param is None and isinstance(details, dict) and details and code == "invalid_request":
            param = next(iter(details))
        return {"error": {"message": message, "type": etype, "param": param, "code": code}}
    body: dict[str, Any] = {"code": code, "message": message}
    if details:
        body["details"] = details
    return {"error": body}


def _flatten_validation(detail: Any) -> tuple[str, Any]:
    """webargs reports {"json": {"field": ["msg"]}}; say it in one sentence too."""
    fields: dict[str, Any] = {}
    if isinstance(detail, dict):
        for _location, errs in detail.items():
            if isinstance(errs, dict):
                fields.update(errs)
            else:
                fields["_body"] = errs
    parts = []
    for name, msgs in fields.items():
        if name in ("_schema", "_body"):
            name = "body"
        parts.extend(_sentences(str(name), msgs))
    return ("invalid request: " + "; ".join(parts)) if parts else "invalid request", fields


def _sentences(path: str, msgs: Any) -> list[str]:
    """``messages: {0: {"content": ["bad"]}}`` -> ``["messages.0.content: bad"]``."""
    if isinstance(msgs, dict):
        return [s for key, sub in msgs.items() for s in _sentences(f"{path}.{key}", sub)]
    if isinstance(msgs, list) and any(isinstance(m, dict) for m in msgs):
        return [s for m in msgs for s in _sentences(path, m)]
    if isinstance(msgs, list):
        msgs = " ".join(str(m) for m in msgs)
    return [f"{path}: {msgs}"]


def _parses_as_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        return False
    return True


#: what a client is told to wait before retrying when the database is unreachable
DATABASE_RETRY_AFTER = 5


def duration(seconds: float) -> str:
    """A wait as OpenAI writes it in ``x-ratelimit-reset-*``: ``20ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    return (f"{hours}h" if hours else "") + (f"{minutes}m" if hours or minutes else "") + text


def limit_headers(rates: RateState) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` for the
    limits that apply to the caller (none when no such limit is set)."""
    h = {}
    for what, w in (("requests", rates.requests), ("tokens", rates.tokens)):
        if w is not None:
            h[f"x-ratelimit-limit-{what}"] = str(w.limit)
            h[f"x-ratelimit-remaining-{what}"] = str(w.remaining)
            h[f"x-ratelimit-reset-{what}"] = duration(w.reset_seconds)
    return h


def rate_headers(state: QuotaState, rates: RateState | None = None) -> dict[str, str]:
    """X-RateLimit-* (and Retry-After when a windowed quota is spent) for a model-call reply,
    and the caller's request and token limits (``rates``) as OpenAI reports them."""
    h = {"X-RateLimit-Limit": str(state.limit), "X-RateLimit-Remaining": str(state.remaining)}
    if state.retry_after is not None:
        h["Retry-After"] = str(state.retry_after)
    if rates is not None:
        h.update(limit_headers(rates))
    return h


def service_error(exc: Exception) -> HTTPError:
    """Map a service or engine exception to its API error (the one place that knows both)."""
    openai = request_dialect() == "openai"
    if isinstance(exc, QuotaExceeded):
        if openai:
            return openai_quota_error(exc.state)
        return api_error(429, "quota exhausted: no model calls left for this user", headers=rate_headers(exc.state))
    if isinstance(exc, RateLimited):
        headers = rate_headers(exc.quota, exc.state) if exc.quota is not None else limit_headers(exc.state)
        if exc.retry_after is None:  # larger than the window: waiting cannot help
            return api_error(429, f"Request too large: it may use up to more tokens than the {exc.whose}'s limit of "
                             f"{exc.limit} tokens per window; lower max_tokens or the prompt.",
                             code="rate_limit_exceeded", headers={**headers, "x-should-retry": "false"},
                             details={"limit": exc.limit, "limit_of": exc.whose, "kind": exc.what})
        return api_error(429, f"Rate limit reached: {exc} Please try again in {exc.retry_after}s.",
                         code="rate_limit_exceeded", headers={**headers, "Retry-After": str(exc.retry_after)},
                         details={"limit": exc.limit, "limit_of": exc.whose, "kind": exc.what})
    if isinstance(exc, BudgetExceeded):
        return api_error(429, f"You exceeded your current quota: {exc}.", code="insufficient_quota",
                         headers={"x-should-retry": "false"},
                         details={"token_budget": exc.budget, "tokens_used": exc.used, "tokens_asked": exc.asked,
                                  "budget_of": exc.whose})
    if isinstance(exc, ContextOverflow):
        if openai:
            return openai_context_error(exc)
        return api_error(422, str(exc), code="prompt_too_long",
                         details={"prompt_tokens": exc.prompt_tokens, "context_size": exc.context_size})
    if isinstance(exc, EngineBusy):
        code = "model_unavailable" if isinstance(exc, ModelUnavailable) else "model_busy"
        return api_error(503, str(exc), code=code, headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, UpstreamTimeout):
        return api_error(504, f"model backend timed out: {exc}", code="upstream_timeout")
    if isinstance(exc, UpstreamError):
        return api_error(502, f"model backend failed: {exc}", code="upstream_error")
    if isinstance(exc, EngineError):
        return api_error(500, "the model failed; your quota unit was refunded", code="model_error")
    if isinstance(exc, QueueUnavailable):
        return api_error(503, "the job queue is unavailable; your quota unit was refunded", code="queue_unavailable")
    if isinstance(exc, JobNotFound):
        return api_error(404, "no such job", code="job_not_found")
    if isinstance(exc, JobFinished):
        return api_error(409, f"job is already {exc.state}; nothing to cancel", code="job_finished",
                         details={"state": exc.state})
    if isinstance(exc, RequestInProgress):
        return api_error(409, "a request with this Idempotency-Key is still in progress; retry after a moment",
                         code="request_in_progress", headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, KeyReused):
        return api_error(422, "this Idempotency-Key was already used with a different request",
                         code="idempotency_key_reused")
    if isinstance(exc, CallbackRefused):
        return api_error(400, f"callback_url: {exc}", code="invalid_callback_url",
                         details={"callback_url": [str(exc)]})
    if isinstance(exc, UnknownModel):
        return api_error(404, f"the model {exc.model_id!r} does not exist", code="model_not_found", param="model")
    if isinstance(exc, ModelNotAllowed):
        return api_error(403, str(exc), code="model_not_allowed", param="model")
    if isinstance(exc, NotFound):
        return api_error(404, str(exc))
    if isinstance(exc, Conflict):
        return api_error(409, str(exc))
    if isinstance(exc, UserError):  # an admin or account change that cannot be made as asked
        return api_error(400, str(exc), code="invalid_request")
    if database_unavailable(exc):
        # the type only: a driver message may name the host, and never the statement's parameters
        log.warning("database unavailable", extra={"error": type(exc).__name__})
        return api_error(503, "the database is unavailable; try again shortly", code="database_unavailable",
                         headers={"Retry-After": str(DATABASE_RETRY_AFTER)})
    raise exc


def openai_quota_error(state: QuotaState) -> HTTPError:
    """429 as OpenAI answers it: a lifetime allowance spent is ``insufficient_quota``
    (retrying cannot help: ``x-should-retry: false`` stops the SDKs' retries); a
    renewing window is ``rate_limit_exceeded`` with ``Retry-After``."""
    if state.retry_after is None:
        return api_error(429, "You exceeded your current quota: no model calls left for this user.",
                         code="insufficient_quota", headers={**rate_headers(state), "x-should-retry": "false"})
    return api_error(429, f"Rate limit reached: {state.limit} model calls per window. Please try again in "
                     f"{state.retry_after}s.", code="rate_limit_exceeded", headers=rate_headers(state))


def openai_context_error(exc: ContextOverflow) -> HTTPError:
    """400 ``context_length_exceeded`` in OpenAI's words, naming the field that is too long."""
    chat = not request.path.endswith("/v1/completions")
    what, param = ("messages", "messages") if chat else ("prompt", "prompt")
    message = (f"This model's maximum context length is {exc.context_size} tokens. However, your {what} "
               f"resulted in {exc.prompt_tokens} tokens. Please reduce the length of the {what}.")
    return api_error(400, message, code="context_length_exceeded", param=param,
                     details={"prompt_tokens": exc.prompt_tokens, "context_size": exc.context_size})


def register_error_handlers(app: APIFlask) -> None:
    @app.error_processor
    def _render(error: HTTPError):  # every HTTP error, validation error and auth error
        status = error.status_code
        code = (error.extra_data or {}).get("code") or CODES.get(status, "error")
        message = error.message
        details = error.detail or None
        if status == 400 and isinstance(error.detail, dict) and "json" in error.detail or (
            status == 400 and isinstance(error.detail, dict) and "query" in error.detail
        ):
            message, details = _flatten_validation(error.detail)
            code = "invalid_request"
            if any("Invalid JSON" in str(v) for v in details.values()):
                code, message, details = "invalid_json", "request body is not valid JSON", None
        elif status == 405:
            message = "method not allowed on this endpoint"
        elif status == 404 and message == "Not Found":
            message = "no such endpoint"
        elif status == 413:
            message = "request body too large"
        elif status == 403 and message == "Forbidden":  # a role check (admin routes): nothing more to say
            message = "forbidden"
        elif status == 401 and message == "Unauthorized":
            message = "valid credentials required (HTTP Basic auth or an API key as a Bearer token)"
        resp = jsonify(error_body(status, code, message, details, param=(error.extra_data or {}).get("param")))
        resp.status_code = status
        for k, v in (error.headers or {}).items():
            resp.headers[k] = v
        return resp

    from werkzeug.exceptions import BadRequest

    @app.errorhandler(BadRequest)
    def _bad_request(exc: BadRequest):
        # werkzeug raises this for undecodable JSON; APIFlask's generic handler
        # would drop the reason, so say it
        if request.get_data(cache=True) and not _parses_as_json(request.get_data(cache=True)):
            return _render(api_error(400, "request body is not valid JSON", code="invalid_json"))
        return _render(api_error(400, exc.description or "bad request"))

    @app.errorhandler(RecursionError)
    def _too_deep(exc: RecursionError):
        # a JSON body nested thousands of levels deep exhausts the parser's recursion
        # (whichever parser met it first): the client's error, not ours
        data = request.get_data(cache=True) if has_request_context() else b""
        if data and not _parses_as_json(data):
            return _render(api_error(400, "request body is not valid JSON (nested too deeply)", code="invalid_json"))
        return _unhandled(exc)

    # services raise these from any route; one mapping answers them all
    for service_exc in (QuotaExceeded, EngineError, QueueUnavailable, JobNotFound, JobFinished, UnknownModel,
                        RequestInProgress, KeyReused, CallbackRefused, ModelNotAllowed, RateLimited,
                        BudgetExceeded, UserError):
        app.register_error_handler(service_exc, lambda exc: _render(service_error(exc)))

    @app.errorhandler(Exception)
    def _unhandled(exc: Exception):
        # never a traceback to the client; the log has it
        log.exception("unhandled error")
        return _render(api_error(500, "internal server error"))

    @app.errorhandler(sa_exc.DBAPIError)
    @app.errorhandler(sa_exc.TimeoutError)
    def _database_error(exc: Exception):
        # an unreachable or slow database is a 503 the client may retry; any other
        # database error is our bug (500, logged with the statement but never its parameters)
        if database_unavailable(exc):
            return _render(service_error(exc))
        return _unhandled(exc)
