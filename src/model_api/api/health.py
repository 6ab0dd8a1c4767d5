"""Liveness and readiness."""

from __future__ import annotations

import time

from apiflask import APIBlueprint
from flask import current_app
from sqlalchemy import text

from .schemas import ReadyOut

bp = APIBlueprint("health", __name__, tag="Health")


@bp.get("/health_check")
@bp.doc(summary="Liveness", description="Cheap check that the API process answers. No auth.", responses={204: "Alive"})
def health_check():
    return "", 204


@bp.get("/ready")
@bp.output(ReadyOut, status_code=200, description="Every component is ready")
@bp.doc(summary="Readiness", description="Database and model state, each with its check latency.",
        responses={503: "A component is not ready (same body)"})
def ready():
    rt = current_app.extensions["model_api"]
    components = {}
    t0 = time.perf_counter()
    try:
        with rt.db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        components["database"] = {"status": "ready"}
    except Exception as exc:  # report, don't raise: this endpoint exists to say what is down
        components["database"] = {"status": "error", "error": type(exc).__name__}
    components["database"]["latency_ms"] = round((time.perf_counter() - t0) * 1000, 2)
    state = rt.engine_state()
    components["model"] = {"status": "ready" if state == "ready" else state}
    if state == "ready":
        components["model"].update(rt.engine.info())
    for name, check in rt.extra_readiness_checks.items():
        components[name] = check()
    ok = all(c.get("status") == "ready" for c in components.values())
    return {"status": "ready" if ok else "not ready", "components": components}, (200 if ok else 503)
