"""ML Model API: a generative chat model behind a metered REST API."""

from .app import create_app

__all__ = ["create_app"]
