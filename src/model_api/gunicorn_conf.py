"""gunicorn settings, read from the same environment as the app.

One process with threads is the default on purpose: every process loads its
own copy of the model and llama.cpp already uses all cores for one decode,
so more processes only add memory and contention (see README, "Serving topology").
"""

import os

bind = os.environ.get("BIND", f"0.0.0.0:{os.environ.get('PORT', '5000')}")
workers = int(os.environ.get("WEB_WORKERS", "1"))
threads = int(os.environ.get("WEB_THREADS", "16"))
worker_class = "gthread"
# longer than the slowest allowed generation (MAX_TOKENS_CAP at a few tokens/s under load)
timeout = int(os.environ.get("WEB_TIMEOUT", "300"))
# SIGTERM: stop accepting, let in-flight calls finish for this long
graceful_timeout = int(os.environ.get("WEB_GRACEFUL_TIMEOUT", "120"))
keepalive = 5
accesslog = None  # the app logs one structured line per request itself
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()

# --- metrics across worker processes -------------------------------------------------
# prometheus_client aggregates several processes through files in
# PROMETHEUS_MULTIPROC_DIR; the variable must be set before any worker imports it,
# i.e. here. With more than one worker and no directory given we make one.
if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    import tempfile

    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _made_metrics_dir = tempfile.mkdtemp(prefix="model-api-metrics-")
else:
    _made_metrics_dir = None


def on_starting(server):
    """Empty the metrics directory: files left by an earlier run would be added in."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(path):
            if name.endswith(".db"):
                os.remove(os.path.join(path, name))


def on_exit(server):
    """Remove the metrics directory if this config made it."""
    if _made_metrics_dir:
        import shutil

        shutil.rmtree(_made_metrics_dir, ignore_errors=True)


def child_exit(server, worker):
    """Drop the dead worker's live gauges (its counters stay in the totals)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


# gunicorn's own lines (start-up, worker boots, timeouts) in the same JSON shape as the app's
if os.environ.get("LOG_FORMAT", "json").lower() == "json":
    logconfig_dict = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "model_api.observability.logs.json_formatter"}},
        "handlers": {"error_console": {"class": "logging.StreamHandler", "formatter": "json",
                                       "stream": "ext://sys.stderr"}},
        # the app installs its own root handler (model_api.observability.logs); none here, or lines double
        "root": {"level": loglevel.upper(), "handlers": []},
        "loggers": {"gunicorn.error": {"level": loglevel.upper(), "handlers": ["error_console"],
                                       "propagate": False, "qualname": "gunicorn.error"}},
    }
