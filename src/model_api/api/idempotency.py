"""The ``Idempotency-Key`` header, for the five POST routes that charge or change
something (``/call_model``, ``/async_call_model``, ``/async_call_cancel``,
``/v1/chat/completions``, ``/v1/completions``): one decorator, the semantics in
``services/idempotency.py``.

It sits directly on the view, so authentication and input validation run
first (a request refused there never touches the key), and it sees the view's
``(body, status, headers)`` before the output schema renders it: a replay goes
through the same rendering. Streamed requests (``"stream": true``) cannot be
replayed (the stream is gone once sent), so a key on one is refused with 400
``idempotency_key_with_stream``, nothing run or charged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from flask import request

from ..services.idempotency import Replay, fingerprint
from .context import runtime
from .errors import api_error
from .security import current_principal

HEADER = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255

#: view functions that take the header (the OpenAPI document lists it on their operations)
IDEMPOTENT_VIEWS: set[str] = set()

# headers a view sets that belong to the reply and are replayed with it
_KEPT = ("X-RateLimit-Limit", "X-RateLimit-Remaining")


def _key() -> str | None:
    raw = request.headers.get(HEADER)
    if raw is None:
        return None
    key = raw.strip()
    if not key or len(key) > MAX_KEY_LENGTH or not key.isascii() or not key.isprintable():
        raise api_error(400, f"{HEADER} must be 1 to {MAX_KEY_LENGTH} printable ASCII characters",
                        code="invalid_idempotency_key")
    return key


def _split(rv: Any) -> tuple[Any, int, dict[str, str]]:
    """A view's return value as (body, status, headers); a Response is not replayable."""
    if not isinstance(rv, tuple):
        return rv, 200, {}
    body, status, headers = (list(rv) + [200, {}][len(rv) - 1:])[:3]
    return body, int(status), dict(headers or {})


def idempotent(view: Callable[..., Any]) -> Callable[..., Any]:
    """Honour ``Idempotency-Key`` on this route (innermost decorator)."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        key = _key()
        if key is None:
            return view(*args, **kwargs)
        body = request.get_json(silent=True)
        if isinstance(body, dict) and body.get("stream"):
            raise api_error(400, f"{HEADER} cannot be used with \"stream\": true (a stream cannot be replayed); "
                            "retry streams without the key, or ask for a JSON reply", code="idempotency_key_with_stream")
        keys = runtime().idempotency
        outcome = keys.begin(current_principal().id, key, fingerprint(request.method, request.path, body))
        if isinstance(outcome, Replay):
            return outcome.body, outcome.status, {**outcome.headers, REPLAYED: "true"}
        try:
            rv = view(*args, **kwargs)
        except BaseException:
            keys.release(outcome)  # nothing was charged: a retry runs again
            raise
        out, status, headers = _split(rv)
        if 200 <= status < 300 and isinstance(out, (dict, list)):
            keys.finish(outcome, status, out, {k: str(v) for k, v in headers.items() if k in _KEPT})
        else:
            keys.release(outcome)
        return rv

    IDEMPOTENT_VIEWS.add(view.__name__)
    return wrapper


__all__ = ["HEADER", "IDEMPOTENT_VIEWS", "REPLAYED", "idempotent"]
