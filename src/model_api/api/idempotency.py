"""The ``Idempotency-Key`` header, for the five POST routes that charge or change
something (``/call_model``, ``/async_call_model``, ``/async_call_cancel``,
``/v1/chat/completions``, ``/v1/completions``): one decorator, the semantics in
``services/idempotency.py``.

It sits directly on the view, so authentication and input validation run
first (a request refused there never touches the key), and it sees the view's
``(body, status, headers)`` before the output schema renders it: a replay goes
through the same rendering.

Streams (``"stream": true``): the first request streams as usual, and its key
remembers the call. A stream cannot be sent twice, so a replay answers with
the call's stored text as the route's ordinary JSON reply (``/call_model``'s
201 body, a ``chat.completion`` / ``text_completion``), built by the route's
``stream_reply``: 409 ``request_in_progress`` while the stream still runs; the
text so far if the stream was cut off (the unit was kept, as for any cut-off
stream); a new run if the call failed (it was refunded).
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable
from typing import Any

from flask import Response, g, request

from ..models import Call, CallStatus
from ..services.idempotency import Replay, RequestInProgress, fingerprint
from .context import runtime
from .errors import api_error
from .security import current_principal

HEADER = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255

#: view functions that take the header (the OpenAPI document lists it on their operations)
IDEMPOTENT_VIEWS: set[str] = set()

#: the stored "response" of a streamed request: the call it started
_STREAM = "stream_call_id"

# headers a view sets that belong to the reply and are replayed with it
_KEPT = ("X-RateLimit-Limit", "X-RateLimit-Remaining")

#: a streaming route's replay: the call's stored text as that route's JSON reply (body, status)
StreamReply = Callable[[Call], tuple[dict[str, Any], int]]


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
    """A view's return value as (body, status, headers)."""
    if isinstance(rv, Response):
        return None, rv.status_code, dict(rv.headers)
    if not isinstance(rv, tuple):
        return rv, 200, {}
    body, status, headers = (list(rv) + [200, {}][len(rv) - 1:])[:3]
    return body, int(status), dict(headers or {})


def _kept(headers: dict[str, str]) -> dict[str, str]:
    return {k: str(v) for k, v in headers.items() if k in _KEPT}


def _stream_replay(replay: Replay, stream_reply: StreamReply | None) -> tuple[Any, int] | None:
    """The reply to a repeated streamed request, or None when the stream's call
    failed (refunded): then the key is forgotten and the request runs again."""
    call = runtime().history.call(uuid.UUID(replay.body[_STREAM]), current_principal().id)
    if call is None or stream_reply is None or call.status == CallStatus.FAILED.value:
        runtime().idempotency.forget(replay)
        return None
    if not CallStatus(call.status).final:
        raise RequestInProgress(request.headers.get(HEADER, ""))
    return stream_reply(call)


def idempotent(view: Callable[..., Any] | None = None, *, stream_reply: StreamReply | None = None):
    """Honour ``Idempotency-Key`` on this route (innermost decorator). Routes that
    can stream pass ``stream_reply``."""
    if view is None:
        return functools.partial(idempotent, stream_reply=stream_reply)

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        key = _key()
        if key is None:
            return view(*args, **kwargs)
        keys = runtime().idempotency
        fp = fingerprint(request.method, request.path, request.get_json(silent=True))
        outcome = keys.begin(current_principal().id, key, fp)
        for _ in range(3):  # a stream whose call failed is forgotten: claim the key again
            if not (isinstance(outcome, Replay) and isinstance(outcome.body, dict) and _STREAM in outcome.body):
                break
            replied = _stream_replay(outcome, stream_reply)
            if replied is not None:
                return replied[0], replied[1], {**outcome.headers, REPLAYED: "true"}
            outcome = keys.begin(current_principal().id, key, fp)
        else:  # pragma: no cover - three failed streams forgotten in a row under our feet
            raise RequestInProgress(key)
        if isinstance(outcome, Replay):
            return outcome.body, outcome.status, {**outcome.headers, REPLAYED: "true"}
        g.pop("stream_call_id", None)
        try:
            rv = view(*args, **kwargs)
        except BaseException:
            keys.release(outcome)  # nothing was charged: a retry runs again
            raise
        out, status, headers = _split(rv)
        stream_call = g.get("stream_call_id")
        if 200 <= status < 300 and stream_call is not None and stream_reply is not None:
            keys.finish(outcome, status, {_STREAM: str(stream_call)}, _kept(headers))
        elif 200 <= status < 300 and isinstance(out, (dict, list)):
            keys.finish(outcome, status, out, _kept(headers))
        else:
            keys.release(outcome)
        return rv

    IDEMPOTENT_VIEWS.add(view.__name__)
    return wrapper


__all__ = ["HEADER", "IDEMPOTENT_VIEWS", "REPLAYED", "StreamReply", "idempotent"]
