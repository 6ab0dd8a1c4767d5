"""Structured logging: one JSON object per line, with the request id (and job id)
of whatever the current thread is working on.

Context travels in a :mod:`contextvars` variable rather than Flask's ``g`` so the
same fields reach log lines written by services, the engine and job workers,
which know nothing about Flask. The web app binds ``request_id`` for each
request; ``Jobs.run`` binds the job's stored ``request_id`` and ``job_id``.
"""

from __future__ import annotations

import contextvars
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from pythonjsonlogger.json import JsonFormatter

_context: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("model_api_log_context", default={})  # noqa: B039 - never mutated

ACCESS_LOGGER = "model_api.access"


def bind(**fields: Any) -> contextvars.Token:
    """Add fields to every log line of the current context; undo with :func:`unbind`."""
    return _context.set({**_context.get(), **{k: v for k, v in fields.items() if v is not None}})


def unbind(token: contextvars.Token) -> None:
    _context.reset(token)


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """``with log_context(request_id=..., job_id=...):`` every line inside carries them."""
    token = bind(**fields)
    try:
        yield
    finally:
        unbind(token)


def current(field: str) -> Any:
    return _context.get().get(field)


class ContextFilter(logging.Filter):
    """Copies the bound context onto each record (explicit ``extra=`` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


def json_formatter() -> logging.Formatter:
    """``{"timestamp", "level", "logger", "message", ...extra fields}``."""
    return JsonFormatter(
        "%(levelname)s %(name)s %(process)d %(message)s",
        rename_fields={"levelname": "level", "name": "logger", "process": "pid"},
        timestamp=True,
    )


def make_handler(stream: TextIO | None = None, fmt: str = "json") -> logging.Handler:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        json_formatter() if fmt == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(request_id)s %(message)s", defaults={"request_id": "-"})
    )
    handler.addFilter(ContextFilter())
    return handler


_HANDLER_MARK = "_model_api_handler"


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Install our handler on the root logger, once per process (idempotent:
    tests and embedders build many apps), replacing any earlier one of ours."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, _HANDLER_MARK, False):
            root.removeHandler(h)
    handler = make_handler(fmt=fmt)
    setattr(handler, _HANDLER_MARK, True)
    root.addHandler(handler)
    root.setLevel(level.upper())
