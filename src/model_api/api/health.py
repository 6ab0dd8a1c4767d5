"""Liveness and readiness."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from apiflask import APIBlueprint
from flask import current_app
from sqlalchemy import text

from ..engine.base import GenerationRequest, SamplingParams
from .docs import error_response
from .observability import is_operator
from .schemas import ReadyOut

bp = APIBlueprint("health", __name__, tag="Health")

_PING = GenerationRequest.single_prompt("ping", SamplingParams(max_tokens=1))


@bp.get("/health_check")
@bp.doc(summary="Liveness", description="Cheap check that the API process answers. No auth.", responses={204: "Alive"})
def health_check():
    return "", 204


def timed_check(check: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one readiness check; never raises. Adds ``latency_ms`` unless the check
    reports its own, and turns an exception into ``{"status": "error", "error": ...}``."""
    t0 = time.perf_counter()
    try:
        result = dict(check())
    except Exception as exc:  # report, don't raise: this endpoint exists to say what is down
        result = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:200]}
    result.setdefault("latency_ms", round((time.perf_counter() - t0) * 1000, 2))
    return result


def _database_check(rt) -> Callable[[], dict[str, Any]]:
    def check() -> dict[str, Any]:
        try:
            with rt.db.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:  # the driver's message may hold the URL: the type is enough
            return {"status": "error", "error": type(exc).__name__}
        return {"status": "ready"}

    return check


def _model_check(rt) -> Callable[[], dict[str, Any]]:
    def check() -> dict[str, Any]:
        state = rt.engines.state()
        engine = rt.engines.peek()
        if engine is None and state != "unloaded":
            if state.startswith("error"):
                return {"status": "error", "error": state.removeprefix("error: ")[:200]}
            return {"status": state}
        info: dict[str, Any] = {"name": rt.models.default}
        if engine is not None:
            engine.prepare(_PING)  # the model answers (tokeniser loaded), without queueing a generation
            from ..observability.metrics import quantisation_of

            info = dict(engine.info())
            info.setdefault("quantisation", quantisation_of(info))
        # else: unloaded to make room for another model (MODEL_MAX_LOADED); it loads again on demand
        if len(rt.models) > 1:
            # MODELS_FILE: every id's state; the others load on first use, so only the default decides
            info["models"] = {model_id: rt.engines.state(model_id) for model_id in rt.engines}
        return {"status": "ready", **info}

    return check


@bp.get("/ready")
@bp.output(ReadyOut, status_code=200, description="Every component is ready")
@bp.doc(summary="Readiness",
        description="Database, model and (when a broker is configured) broker state. Anyone sees "
        "each component's `status`; loopback clients (and callers with `Authorization: Bearer "
        "METRICS_TOKEN`) also see each check's latency, errors and the model's details. 503 with the "
        "same body when any component is not ready.",
        responses={503: {"description": "A component is not ready (same body as 200)",
                         "content": {"application/json": {"schema": ReadyOut, "example": {
                             "status": "not ready",
                             "components": {"database": {"status": "error", "error": "OperationalError",
                                                         "latency_ms": 3.1},
                                            "model": {"status": "loading", "latency_ms": 0.01}}}}}}})
def ready():
    rt = current_app.extensions["model_api"]
    components = {"database": timed_check(_database_check(rt)), "model": timed_check(_model_check(rt))}
    for name, check in rt.extra_readiness_checks.items():
        components[name] = timed_check(check)
    ok = all(c.get("status") == "ready" for c in components.values())
    if not is_operator():
        # anyone may ask what is up; only an operator learns file paths, hosts and errors
        components = {name: {"status": c["status"]} for name, c in components.items()}
    return {"status": "ready" if ok else "not ready", "components": components}, (200 if ok else 503)


__all__ = ["bp", "error_response", "timed_check"]
