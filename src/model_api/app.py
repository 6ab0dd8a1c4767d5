"""Application factory: it only wires settings → extensions → blueprints →
error handlers → CLI. Behaviour lives in the services."""

from __future__ import annotations

import threading
from typing import Any

from apiflask import APIFlask
from flask import request

from .observability.logs import configure_logging
from .runtime import Runtime
from .settings import Settings


def create_app(overrides: dict[str, Any] | None = None, *, runtime: Runtime | None = None) -> APIFlask:
    settings = Settings(**(overrides or {}))
    app = APIFlask(
        "model_api",
        title="ML Model API",
        version="0.1.0",
        spec_path="/openapi.json",
        docs_path="/docs",
    )
    register_config(app, settings)
    register_extensions(app, settings, runtime)
    register_request_hooks(app)
    register_blueprints(app)
    register_errors(app)
    register_cli(app)
    return app


def register_config(app: APIFlask, settings: Settings) -> None:
    app.config.update(
        SETTINGS=settings,
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        VALIDATION_ERROR_STATUS_CODE=400,  # the seed's clients expect 400 for bad input
        VALIDATION_ERROR_DESCRIPTION="Invalid request",
        JSON_SORT_KEYS=False,
        PROPAGATE_EXCEPTIONS=False,  # our JSON 500 handler, never a traceback
    )
    app.json.sort_keys = False  # type: ignore[attr-defined]
    configure_logging(settings.log_level, settings.log_format)
    from .api.docs import configure_docs

    configure_docs(app)


def register_extensions(app: APIFlask, settings: Settings, runtime: Runtime | None) -> None:
    rt = runtime or Runtime(settings)
    app.extensions["model_api"] = rt
    if settings.model_load_at_start:
        rt.engines.load_in_background()
    if settings.recover_jobs_at_start:
        threading.Thread(target=rt.recover_jobs, name="job-recovery", daemon=True).start()
    if not settings.celery_broker_url:
        rt.webhooks.start()  # this process runs the jobs, so it delivers their webhooks (Celery workers do otherwise)


def register_request_hooks(app: APIFlask) -> None:
    """X-Request-ID in and out, one structured log line and one latency sample per request."""
    from .api.observability import register_request_hooks as _hooks

    _hooks(app)

    @app.before_request
    def _body_is_json() -> None:
        # Every body this API takes is JSON. Read it as JSON whatever the
        # Content-Type says (curl -d sends form-encoded), so a client gets a
        # clear "not valid JSON" rather than a puzzling "prompt missing".
        ctype = request.environ.get("CONTENT_TYPE", "")
        if request.method in ("POST", "PUT", "PATCH") and "json" not in ctype and request.content_length:
            request.environ["CONTENT_TYPE"] = "application/json"  # before anything parses it


def register_blueprints(app: APIFlask) -> None:
    from .api import health, model_calls, observability, openai_api

    app.register_blueprint(health.bp)
    app.register_blueprint(model_calls.bp)
    app.register_blueprint(openai_api.bp)
    app.register_blueprint(observability.bp)


def register_errors(app: APIFlask) -> None:
    from .api.errors import register_error_handlers

    register_error_handlers(app)


def register_cli(app: APIFlask) -> None:
    from .cli import register_commands

    register_commands(app)
