"""Application factory: it only wires settings → extensions → blueprints →
error handlers → CLI. Behaviour lives in the services."""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any

from apiflask import APIFlask
from flask import g, request

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
    logging.basicConfig(level=settings.log_level)


def register_extensions(app: APIFlask, settings: Settings, runtime: Runtime | None) -> None:
    rt = runtime or Runtime(settings)
    app.extensions["model_api"] = rt
    if settings.model_load_at_start:
        rt.load_engine_in_background()
    if settings.recover_jobs_at_start:
        threading.Thread(target=rt.recover_jobs, name="job-recovery", daemon=True).start()


def register_request_hooks(app: APIFlask) -> None:
    @app.before_request
    def _request_id() -> None:
        incoming = request.headers.get("X-Request-ID", "")
        # accept a client's id if it is sane, otherwise make one
        g.request_id = incoming if incoming and len(incoming) <= 64 and incoming.isprintable() else uuid.uuid4().hex

    @app.before_request
    def _body_is_json() -> None:
        # Every body this API takes is JSON. Read it as JSON whatever the
        # Content-Type says (curl -d sends form-encoded), so a client gets a
        # clear "not valid JSON" rather than a puzzling "prompt missing".
        ctype = request.environ.get("CONTENT_TYPE", "")
        if request.method in ("POST", "PUT", "PATCH") and "json" not in ctype and request.content_length:
            request.environ["CONTENT_TYPE"] = "application/json"  # before anything parses it

    @app.after_request
    def _echo_request_id(resp):
        resp.headers["X-Request-ID"] = g.get("request_id", "")
        return resp


def register_blueprints(app: APIFlask) -> None:
    from .api import health, model_calls, openai_api

    app.register_blueprint(health.bp)
    app.register_blueprint(model_calls.bp)
    app.register_blueprint(openai_api.bp)


def register_errors(app: APIFlask) -> None:
    from .api.errors import register_error_handlers

    register_error_handlers(app)


def register_cli(app: APIFlask) -> None:
    from .cli import register_commands

    register_commands(app)
