"""Per-request logging and metrics (every route gets them for free) and ``/metrics``.

A route adds model-call facts to its request's log line by setting
``g.usage = (prompt_tokens, completion_tokens, generation_seconds)``; auth sets
``g.user``. Nothing else is needed.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import time
import uuid

from apiflask import APIBlueprint, APIFlask
from flask import Response, current_app, g, request
from sqlalchemy import func, select

from ..models import Call, CallKind, CallStatus
from ..observability import logs, metrics
from .errors import api_error

access_log = logging.getLogger(logs.ACCESS_LOGGER)

bp = APIBlueprint("operations", __name__, tag="Operations")

_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}


def _request_id() -> str:
    incoming = request.headers.get("X-Request-ID", "")
    # accept a client's id if it is sane (it goes into logs and a 64-char column), otherwise make one
    if incoming and len(incoming) <= 64 and incoming.isprintable() and incoming.isascii():
        return incoming
    return uuid.uuid4().hex


def register_request_hooks(app: APIFlask) -> None:
    """Request id in and out, one JSON access-log line and one histogram sample per request."""

    @app.before_request
    def _start() -> None:
        g.request_started = time.perf_counter()
        g.request_id = _request_id()
        g.log_token = logs.bind(request_id=g.request_id)

    @app.after_request
    def _finish(resp: Response) -> Response:
        resp.headers["X-Request-ID"] = g.get("request_id", "")
        state = g._get_current_object()  # read after a streamed body ends, when the context may be gone
        method = request.method if request.method in _METHODS else "OTHER"
        route = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
        fields = {"method": method, "route": route, "path": request.path}

        def emit() -> None:
            latency = time.perf_counter() - getattr(state, "request_started", time.perf_counter())
            metrics.observe_http(method, route, resp.status_code, latency)
            extra = {
                "request_id": getattr(state, "request_id", None),
                "user": getattr(state, "user", None),
                **fields,
                "status": resp.status_code,
                "latency_ms": round(latency * 1000, 2),
            }
            usage = getattr(state, "usage", None)
            if usage:
                extra.update(prompt_tokens=usage[0], completion_tokens=usage[1],
                             model_seconds=round(usage[2], 4))
            access_log.log(logging.ERROR if resp.status_code >= 500 else logging.INFO, "request", extra=extra)

        # after the reply is written (the WSGI server closes its body): a stream's latency and
        # usage are known only at its end, and no client waits on a log line or a histogram
        resp.call_on_close(emit)
        return resp

    @app.teardown_request
    def _unbind(_exc: BaseException | None) -> None:
        token = g.pop("log_token", None)
        if token is not None:
            try:
                logs.unbind(token)
            except ValueError:  # reset from another context (should not happen); never fail a request
                pass


# --- /metrics --------------------------------------------------------------------

class JobsInStateCollector:
    """``model_api_jobs_in_state{state}``: async jobs queued or running now, read from
    the database at scrape time (the database is the truth, across all processes)."""

    def __init__(self, db):
        self._db = db

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        fam = GaugeMetricFamily("model_api_jobs_in_state", "Async jobs currently queued or running.", labels=["state"])
        counts = dict.fromkeys((CallStatus.QUEUED.value, CallStatus.RUNNING.value), 0)
        try:
            with self._db.session() as s:
                rows = s.execute(
                    select(Call.status, func.count(Call.id))
                    .where(Call.kind == CallKind.ASYNC.value, Call.status.in_(list(counts)))
                    .group_by(Call.status)
                ).all()
            counts.update({status: int(n) for status, n in rows})
        except Exception:  # a scrape must not fail because the database is down; /ready says so
            return
        for state, n in counts.items():
            fam.add_metric([state], n)
        yield fam


def _is_local(addr: str | None) -> bool:
    try:
        return addr is not None and ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def _local_open() -> bool:
    s = current_app.extensions["model_api"].settings
    return s.metrics_local_open and _is_local(request.remote_addr)


def _has_metrics_token() -> bool:
    s = current_app.extensions["model_api"].settings
    if not s.metrics_token:
        return False
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), s.metrics_token.encode())


def is_operator() -> bool:
    """Whether this request may read operational details (``/metrics``, ``/ready``'s
    paths and errors): a loopback client (unless METRICS_LOCAL_OPEN is off) or one
    carrying METRICS_TOKEN."""
    return _local_open() or _has_metrics_token()


def _check_metrics_access() -> None:
    if _local_open():
        return
    if not current_app.extensions["model_api"].settings.metrics_token:
        raise api_error(403, "metrics are served to local clients only (set METRICS_TOKEN to allow others)")
    if not _has_metrics_token():
        raise api_error(401, "a valid metrics token is required (Authorization: Bearer ...)",
                        headers={"WWW-Authenticate": 'Bearer realm="metrics"'})


@bp.get("/metrics")
@bp.doc(
    summary="Prometheus metrics",
    description="Prometheus text exposition of every process's metrics (see docs/operations.md, \"Metrics\"). "
    "Open to loopback clients; others need `Authorization: Bearer METRICS_TOKEN`.",
    responses={
        200: {"description": "Metrics in Prometheus text format",
              "content": {"text/plain": {"schema": {"type": "string"}}}},
        401: "A token is configured and the request did not carry it",
        403: "Not a local client and no token is configured",
    },
    security=[{}, {"MetricsToken": []}],
)
def metrics_view():
    _check_metrics_access()
    rt = current_app.extensions["model_api"]
    body, content_type = metrics.render([JobsInStateCollector(rt.db)])
    return Response(body, status=200, content_type=content_type)
