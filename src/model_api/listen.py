"""Where gunicorn listens, from the environment (shared by gunicorn_conf.py and
``make run``'s banner).

BIND wins when set; otherwise WEB_HOST:PORT. WEB_HOST defaults to 127.0.0.1, so
a development server is reachable from this machine only; the image sets
WEB_HOST=0.0.0.0 (a container must listen on every interface to be reached).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = "5000"


def bind_from_env(environ: Mapping[str, str] = os.environ) -> str:
    bind = environ.get("BIND", "").strip()
    if bind:
        return bind
    host = environ.get("WEB_HOST", "").strip() or DEFAULT_HOST
    port = environ.get("PORT", "").strip() or DEFAULT_PORT
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
