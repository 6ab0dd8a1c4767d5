"""Celery entry point: ``celery -A model_api.worker worker -Q model_api.jobs -c 1``.

Reads the same environment as the server (CELERY_BROKER_URL, DATABASE_URL,
...). ``model-api worker`` does the same with the queue filled in. With
WORKER_METRICS_PORT set, the worker serves Prometheus metrics of itself and its
pool processes on that port (docs/operations.md, "Metrics").
"""

from .settings import get_settings

_settings = get_settings()
if _settings.worker_metrics_port:
    # the pool processes run the jobs; their numbers reach the parent's metrics
    # port through files, a mode prometheus_client fixes when it is first
    # imported, i.e. after this line and never before (see observability.multiproc)
    from .observability import multiproc

    multiproc.ensure_dir("model-api-worker-metrics-")

from .celery_app import make_celery  # noqa: E402 - after the metrics directory, on purpose

app = make_celery(_settings)
