"""ML Model API: a generative chat model behind a metered REST API."""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    # Lazy on purpose: gunicorn imports ``model_api.gunicorn_conf`` in its master
    # process, and that must not import the app (hence prometheus_client) before
    # the config has set PROMETHEUS_MULTIPROC_DIR for the workers.
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(name)
