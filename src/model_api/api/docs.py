"""The OpenAPI document's shared parts: the error shape, headers, security schemes,
examples, and Swagger UI served from local files.

Routes describe themselves with APIFlask decorators; what every response has in
common (``X-Request-ID``) is added here once, mirroring the one hook that sets it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from apiflask import APIFlask
from flask import send_from_directory

from .errors import error_body
from .idempotency import HEADER as IDEMPOTENCY_HEADER
from .idempotency import IDEMPOTENT_VIEWS, MAX_KEY_LENGTH, REPLAYED
from .schemas import ErrorOut, OpenAIErrorOut

REQUEST_ID_HEADER = {
    "description": "The client's X-Request-ID if it sent a sane one (printable ASCII, at most 64 "
    "characters), else a generated id. Also in the request's log lines and its async job's.",
    "schema": {"type": "string", "example": "3f2b6c1e9a7d4f0b8e5c2a1d0f9e8b7c"},
    "required": True,
}
RATE_LIMIT_HEADERS = {
    "X-RateLimit-Limit": {"description": "Model calls this user may make (per window, if any)",
                          "schema": {"type": "integer", "example": 3}, "required": True},
    "X-RateLimit-Remaining": {"description": "Model calls left", "schema": {"type": "integer", "example": 2},
                              "required": True},
    # OpenAI's, for the limits that apply to the caller (README "Limits")
    **{f"x-ratelimit-{part}-{what}": {
        "description": f"{desc} ({what} per window; only when such a limit applies)",
        "schema": {"type": "string" if part == "reset" else "integer", "example": example}}
       for what in ("requests", "tokens")
       for part, desc, example in (("limit", "The limit", 60), ("remaining", "What is left", 59),
                                   ("reset", "Until the window is empty again, e.g. `1s`, `6m0s`", "1s"))},
}
RETRY_AFTER_HEADER = {
    "description": "Seconds until the quota window renews (only when QUOTA_WINDOW_SECONDS is set) "
    "or until the model has capacity again",
    "schema": {"type": "integer", "example": 3600},
}

#: one Server-Sent Event of a streamed reply (OpenAPI before 3.2 describes each event
#: of a text/event-stream with ``schema``; schemathesis checks every event against it)
SSE_EVENT_SCHEMA = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {"type": "string", "description": "A JSON chunk (`chat.completion.chunk` or `text_completion`), "
                 "an error object `{\"error\": ...}` if the generation fails after the stream began, or the "
                 "final `[DONE]`."},
        "event": {"type": "string", "description": "Always the default, `message`."},
    },
}

IDEMPOTENCY_PARAMETER = {
    "in": "header", "name": IDEMPOTENCY_HEADER, "required": False,
    "description": "A unique key (e.g. a UUID) per logical request, to retry it safely: the first request with "
    "a key runs; a repeat with the same key and the same body returns the stored response (marked "
    f"`{REPLAYED}: true`) without running or charging again; a repeat while the first still runs is a 409 "
    "`request_in_progress` (with `Retry-After`); the same key with another body is a 422 "
    "`idempotency_key_reused`. Keys are per user and expire after IDEMPOTENCY_TTL_SECONDS. Only successful "
    "responses are stored: after an error, the same key runs again. With `\"stream\": true` the first "
    "request streams; a repeat gets the stream's text as this route's JSON reply (a stream cannot be sent twice).",
    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH, "pattern": "^[!-~]([ -~]*[!-~])?$"},
}
REPLAYED_HEADER = {"description": "`true` when this is the stored response of an earlier request with the same "
                   "Idempotency-Key (nothing ran or was charged this time)",
                   "schema": {"type": "string", "enum": ["true"]}}
#: the idempotency refusals, added to the operations that take the header
IDEMPOTENCY_ERRORS = {
    409: ("request_in_progress", "a request with this Idempotency-Key is still in progress; retry after a moment",
          "A request with the same Idempotency-Key is still running (retry after `Retry-After`)"),
    422: ("idempotency_key_reused", "this Idempotency-Key was already used with a different request",
          "The Idempotency-Key was used with a different request body"),
}

WEBHOOK_HEADERS = [
    {"in": "header", "name": "webhook-id", "required": True, "schema": {"type": "string", "format": "uuid"},
     "description": "The delivery's id, the same on every retry: de-duplicate on it (delivery is at least once)."},
    {"in": "header", "name": "webhook-timestamp", "required": True, "schema": {"type": "integer"},
     "description": "Unix time of this attempt; refuse ones far from now (replays)."},
    {"in": "header", "name": "webhook-signature", "required": True, "schema": {"type": "string"},
     "description": "`v1,` + base64 HMAC-SHA256, keyed with your webhook secret (`whsec_...`, base64 after the "
     "prefix), of `{webhook-id}.{webhook-timestamp}.{body}` (Standard Webhooks)."},
]


def job_end_callback(status_schema: dict) -> dict:
    """The OpenAPI ``callbacks`` entry of /async_call_model: what its callback_url receives."""
    return {"jobEnded": {"{$request.body#/callback_url}": {"post": {
        "summary": "The job ended (completed, failed or cancelled)",
        "description": "The same JSON as `GET /async_call_status` at the job's end (without `webhook`). "
        "Answer 2xx to acknowledge; anything else (or no answer within WEBHOOK_TIMEOUT_SECONDS) is retried "
        "after WEBHOOK_BACKOFF_SECONDS, up to WEBHOOK_MAX_ATTEMPTS.",
        "parameters": WEBHOOK_HEADERS,
        "requestBody": {"required": True, "content": {"application/json": {"schema": status_schema}}},
        "responses": {"2XX": {"description": "Delivered"},
                      "default": {"description": "Not delivered: retried with backoff"}},
    }}}}


# status -> (description, example code, example message): the seed's situations
ERRORS: dict[int, tuple[str, str, str]] = {
    400: ("Invalid JSON, a non-object body, a missing/blank/non-string prompt, text with a NUL or an "
          "unpaired surrogate, or a bad parameter (every invalid field is listed)",
          "invalid_request", "invalid request: prompt: Missing data for required field."),
    401: ("Missing, malformed or wrong credentials (with WWW-Authenticate)",
          "unauthorized", "valid credentials required (HTTP Basic auth or an API key as a Bearer token)"),
    403: ("The caller may not use this model (`model_not_allowed`; nothing charged)", "model_not_allowed",
          "you may not use the model 'gpu'"),
    404: ("No such job for this user (also for other users' jobs)", "job_not_found", "no such job"),
    409: ("The job already finished (completed, failed or cancelled)", "job_finished",
          "job is already completed; nothing to cancel"),
    413: ("Body larger than MAX_BODY_BYTES", "payload_too_large", "request body too large"),
    422: ("Prompt longer than the model's context", "prompt_too_long",
          "prompt is 3000 tokens; this model's context holds 2048 including at least one generated token"),
    429: ("Quota exhausted", "quota_exceeded", "quota exhausted: no model calls left for this user"),
    500: ("The model failed (the quota unit was refunded)", "model_error",
          "the model failed; your quota unit was refunded"),
    502: ("A remote model backend failed", "upstream_error", "model backend failed: ..."),
    503: ("The model is at capacity (nothing charged), the job queue is unavailable (unit refunded), or "
          "the database is unreachable or too slow (`database_unavailable`, with Retry-After)",
          "queue_unavailable",
          "the job queue is unavailable; your quota unit was refunded"),
    504: ("A remote model backend timed out", "upstream_timeout", "model backend timed out: ..."),
}




def error_response(status: int, description: str | None = None, headers: dict[str, Any] | None = None,
                   *, openai: bool = False) -> dict:
    """An ``@bp.doc(responses=...)`` entry in the shared error shape (OpenAI's with
    ``openai=True``, as ``/v1/*`` answers), with an example."""
    desc, code, message = ERRORS.get(status, (description or "Error", "error", description or "error"))
    # the example is rendered by the same function that renders real errors
    example = error_body(status, code, message, dialect="openai" if openai else "ours")
    schema = OpenAIErrorOut if openai else ErrorOut
    out: dict[str, Any] = {
        "description": description or desc,
        "content": {"application/json": {"schema": schema, "example": example}},
    }
    if headers:
        out["headers"] = headers
    return out


def error_responses(*statuses: int, openai: bool = False, **overrides: str) -> dict[int, dict]:
    """``error_responses(400, 401, 429)``: the standard entries (429 with its headers);
    ``openai=True`` for routes under ``/v1`` (OpenAI's error shape)."""
    out = {}
    for st in statuses:
        headers = None
        if st == 429:
            headers = {**RATE_LIMIT_HEADERS, "Retry-After": RETRY_AFTER_HEADER}
        elif st == 503:
            headers = {"Retry-After": RETRY_AFTER_HEADER}
        elif st == 401:
            headers = {"WWW-Authenticate": {"description": 'Basic realm="ML Model API" (the challenge; '
                                            'an API key is also accepted as a Bearer token)',
                                            "schema": {"type": "string"}}}
        out[st] = error_response(st, overrides.get(f"d{st}"), headers, openai=openai)
    return out


def swagger_ui_dir() -> Path | None:
    """Swagger UI's files from the pinned ``flask-swagger-ui`` package (we use only its
    ``dist/`` folder), so /docs works offline; None falls back to APIFlask's CDN."""
    spec = importlib.util.find_spec("flask_swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        return None
    dist = Path(list(spec.submodule_search_locations)[0]) / "dist"
    return dist if (dist / "swagger-ui-bundle.js").exists() else None


def configure_docs(app: APIFlask) -> None:
    """Error schemas, security schemes, local Swagger UI and the spec processor."""
    app.config.update(
        HTTP_ERROR_SCHEMA=ErrorOut,
        VALIDATION_ERROR_SCHEMA=ErrorOut,
        SECURITY_SCHEMES={
            "MetricsToken": {"type": "http", "scheme": "bearer",
                             "description": "METRICS_TOKEN, for /metrics from non-local clients"},
        },
        INFO={
            "description": "Metered access to a generative chat model. Every error has the shape "
            '`{"error": {"code", "message", "details"?}}`; every response carries `X-Request-ID`.',
        },
    )
    dist = swagger_ui_dir()
    if dist is not None:
        app.config.update(
            SWAGGER_UI_CSS="/docs/assets/swagger-ui.css",
            SWAGGER_UI_BUNDLE_JS="/docs/assets/swagger-ui-bundle.js",
            SWAGGER_UI_STANDALONE_PRESET_JS="/docs/assets/swagger-ui-standalone-preset.js",
            DOCS_FAVICON="/docs/assets/favicon-32x32.png",
        )

        @app.get("/docs/assets/<path:filename>")
        @app.doc(hide=True)
        def swagger_assets(filename: str):
            return send_from_directory(dist, filename, max_age=86400)

    # APIFlask keeps one spec processor: this one does everything
    @app.spec_processor
    def _process(spec: dict) -> dict:
        for path_item in spec.get("paths", {}).values():
            for op in path_item.values():
                if not isinstance(op, dict) or "responses" not in op:
                    continue
                for resp in op["responses"].values():
                    resp.setdefault("headers", {})["X-Request-ID"] = REQUEST_ID_HEADER
                if "requestBody" in op:
                    # every body we take has required fields: a missing body is a 400, so say it is required
                    op["requestBody"].setdefault("required", True)
                params = op.setdefault("parameters", [])
                if not any(p.get("name") == "X-Request-ID" for p in params):
                    params.append({"in": "header", "name": "X-Request-ID", "required": False,
                                   "description": "Your id for this request (echoed, logged, kept with the "
                                   "job). One that is not printable ASCII of at most 64 characters is "
                                   "replaced by a generated id, not refused.",
                                   "schema": {"type": "string"}})
        _idempotency(spec)
        _deployment_limits(spec)
        return spec

    def _idempotency(spec: dict) -> None:
        # the header, its refusals and the replay marker on the routes @idempotent decorates
        paths = spec.get("paths", {})
        for rule in app.url_map.iter_rules():
            if rule.endpoint.rsplit(".", 1)[-1] not in IDEMPOTENT_VIEWS or "POST" not in (rule.methods or ()):
                continue
            op = paths.get(rule.rule, {}).get("post")
            if op is None:
                continue
            op["parameters"].insert(0, IDEMPOTENCY_PARAMETER)
            openai = rule.rule.startswith("/v1/")
            for status, (code, message, desc) in IDEMPOTENCY_ERRORS.items():
                resp = op["responses"].get(str(status))
                if resp is None:
                    schema = _schema_name(spec, "OpenAIErrorOut" if openai else "ErrorOut")
                    resp = op["responses"][str(status)] = {"description": desc, "content": {"application/json": {
                        "schema": {"$ref": f"#/components/schemas/{schema}"},
                        "example": error_body(status, code, message, dialect="openai" if openai else "ours")}},
                        "headers": {"X-Request-ID": REQUEST_ID_HEADER}}
                else:
                    resp["description"] += f"; or `{code}`: {desc}"
                if status == 409:
                    resp.setdefault("headers", {})["Retry-After"] = RETRY_AFTER_HEADER
            for status, resp in op["responses"].items():
                if status.startswith("2"):
                    resp.setdefault("headers", {})[REPLAYED] = REPLAYED_HEADER
            if rule.rule == "/async_call_model":
                op["callbacks"] = job_end_callback(
                    {"$ref": f"#/components/schemas/{_schema_name(spec, 'StatusOut')}"})

    def _schema_name(spec: dict, wanted: str) -> str:
        schemas = spec.get("components", {}).get("schemas", {})
        for name in (wanted, wanted.removesuffix("Out")):
            if name in schemas:
                return name
        return wanted

    def _deployment_limits(spec: dict) -> None:
        # limits that are settings, so the document states this deployment's (400 above them)
        settings = app.config["SETTINGS"]
        schemas = spec.get("components", {}).get("schemas", {})
        for name in ("CallModelIn", "AsyncCallModelIn", "ChatCompletionIn", "CompletionIn"):
            props = schemas.get(name, {}).get("properties", {})
            for field in ("max_tokens", "max_completion_tokens"):
                if field in props:
                    props[field]["maximum"] = settings.max_tokens_cap
