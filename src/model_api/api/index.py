"""``GET /``: what this service is and where to go, instead of a bare 404."""

from __future__ import annotations

from apiflask import APIBlueprint, Schema
from apiflask.fields import Dict, String
from flask import redirect, request

from ..version import package_version

bp = APIBlueprint("index", __name__, tag="Index")


class IndexOut(Schema):
    name = String(required=True, metadata={"example": "ML Model API"})
    version = String(required=True, metadata={"example": "0.1.0"})
    links = Dict(keys=String(), values=String(), required=True, metadata={
        "description": "Where to go next: the API docs, the OpenAPI document, liveness and readiness.",
        "example": {"docs": "/docs", "openapi": "/openapi.json", "health": "/health_check", "ready": "/ready"}})


@bp.get("/")
@bp.output(IndexOut, status_code=200, description="The service's name, version and main links")
@bp.doc(summary="Service index", description="No auth. Where to find the API docs and the health checks. "
        "A browser (`Accept: text/html` preferred) is redirected to the web console, `/console/`.")
def index():
    # a browser (asking for HTML first) goes to the web console; API clients get this JSON
    if request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html":
        return redirect("/console/")
    return {"name": "ML Model API", "version": package_version(),
            "links": {"docs": "/docs", "openapi": "/openapi.json", "health": "/health_check", "ready": "/ready"}}
