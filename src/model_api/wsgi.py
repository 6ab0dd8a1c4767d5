"""WSGI entry point for gunicorn: ``gunicorn -c python:model_api.gunicorn_conf model_api.wsgi:app``."""

from .app import create_app

app = create_app()
