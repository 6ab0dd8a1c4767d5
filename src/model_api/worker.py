"""Celery entry point: ``celery -A model_api.worker worker -Q model_api.jobs -c 1``.

Reads the same environment as the server (CELERY_BROKER_URL, DATABASE_URL,
...). ``model-api worker`` does the same with the queue filled in.
"""

from .celery_app import make_celery
from .settings import get_settings

app = make_celery(get_settings())
