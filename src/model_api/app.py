"""Application factory: it only wires settings → extensions → blueprints →
error handlers → CLI. Behaviour lives in the services."""

from __future__ import annotations

import io
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
    if settings.trusted_proxies:
        # behind nginx (deploy/nginx.conf.template) every peer is the proxy: take the
        # client's address from the X-Forwarded-For entries those proxies appended
        from werkzeug.middleware.proxy_fix import ProxyFix

        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxies,  # type: ignore[method-assign]
                                x_proto=settings.trusted_proxies)
    configure_logging(settings.log_level, settings.log_format)
    from .api.docs import configure_docs

    configure_docs(app)


def register_extensions(app: APIFlask, settings: Settings, runtime: Runtime | None) -> None:
    rt = runtime or Runtime(settings)
    app.extensions["model_api"] = rt
    if settings.model_load_at_start:
        rt.engines.load_in_background()
    if settings.recover_jobs_at_start:
        rt.start_reconciler()
    if settings.deliver_webhooks and not settings.celery_broker_url:
        rt.webhooks.start()  # this process runs the jobs, so it delivers their webhooks (Celery workers do otherwise)


def register_request_hooks(app: APIFlask) -> None:
    """X-Request-ID in and out, one structured log line and one latency sample per request."""
    from .api.observability import register_request_hooks as _hooks

    _hooks(app)
    from .api import wire

    wire.init_app(app)  # after the access line's hook, so that its own runs first (api/wire.py)

    @app.before_request
    def _chunked_body_within_limit() -> None:
        # A body without Content-Length (Transfer-Encoding: chunked) has no size to
        # check up front, and werkzeug would silently cut it at MAX_CONTENT_LENGTH:
        # read it here, up to one byte more than allowed, so one byte over is a 413
        # and a body within the limit is read as if it had come with its length.
        env = request.environ
        if request.content_length is not None or "chunked" not in env.get("HTTP_TRANSFER_ENCODING", "").lower():
            return
        if "wsgi.input_terminated" not in env:  # the server does not de-chunk: werkzeug reads nothing
            return
        read_bounded_body(env, app.config["MAX_CONTENT_LENGTH"])

    @app.before_request
    def _body_is_json() -> None:
        # Every body this API takes is JSON. Read it as JSON whatever the
        # Content-Type says (curl -d sends form-encoded), so a client gets a
        # clear "not valid JSON" rather than a puzzling "prompt missing".
        ctype = request.environ.get("CONTENT_TYPE", "")
        if request.blueprint == "console":  # the web console's forms are form-encoded, as browsers send them
            return
        if request.method in ("POST", "PUT", "PATCH") and "json" not in ctype and request.content_length:
            request.environ["CONTENT_TYPE"] = "application/json"  # before anything parses it


def read_bounded_body(environ: dict[str, Any], limit: int) -> None:
    """Read a body of unknown length into memory, at most ``limit`` bytes, and present
    it to the app with its Content-Length; 413 (RequestEntityTooLarge) above ``limit``
    (gunicorn then drains a bounded amount of the rest, or closes the connection)."""
    from werkzeug.exceptions import RequestEntityTooLarge

    stream = environ["wsgi.input"]
    chunks, size = [], 0
    while size <= limit:
        chunk = stream.read(min(64 * 1024, limit + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > limit:
        raise RequestEntityTooLarge()
    data = b"".join(chunks)
    environ["wsgi.input"] = io.BytesIO(data)
    environ["CONTENT_LENGTH"] = str(len(data))
    environ.pop("HTTP_TRANSFER_ENCODING", None)


def register_blueprints(app: APIFlask) -> None:
    from .api import admin, health, index, me, model_calls, observability, openai_api

    app.register_blueprint(index.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(model_calls.bp)
    app.register_blueprint(openai_api.bp)
    app.register_blueprint(observability.bp)
    app.register_blueprint(admin.bp)
    app.register_blueprint(me.bp)
    from . import console

    console.init_app(app)


def register_errors(app: APIFlask) -> None:
    from .api.errors import register_error_handlers

    register_error_handlers(app)


def register_cli(app: APIFlask) -> None:
    from .cli import register_commands

    register_commands(app)
