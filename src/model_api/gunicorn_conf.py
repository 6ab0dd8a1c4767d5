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
