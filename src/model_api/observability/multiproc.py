"""prometheus_client's multiprocess directory, for processes that fork workers.

prometheus_client picks single- or multi-process mode when it is first imported,
from ``PROMETHEUS_MULTIPROC_DIR``, so the directory must be chosen before that
import: this module therefore imports nothing from prometheus_client. gunicorn's
config and the Celery worker entry point (``model_api.worker``) call it.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

ENV = "PROMETHEUS_MULTIPROC_DIR"

_made: str | None = None


def ensure_dir(prefix: str = "model-api-metrics-") -> str:
    """Make ``PROMETHEUS_MULTIPROC_DIR`` name an existing directory and return it:
    the one the environment gives (kept as it is: another server may share it), or
    a fresh temporary one that :func:`remove_made_dir` deletes at exit."""
    global _made
    if "prometheus_client" in sys.modules and not os.environ.get(ENV):
        # too late: this process already counts in memory, and forked children would too
        raise RuntimeError(f"{ENV} must be set before prometheus_client is imported")
    path = os.environ.get(ENV)
    if path:
        os.makedirs(path, exist_ok=True)
        return path
    _made = tempfile.mkdtemp(prefix=prefix)
    os.environ[ENV] = _made
    return _made


def remove_made_dir() -> None:
    """Delete the directory :func:`ensure_dir` created (never one that was given)."""
    global _made
    if _made:
        shutil.rmtree(_made, ignore_errors=True)
        _made = None
