"""Server-Sent Events for streamed calls (``/v1/*`` with ``stream: true`` and
``/call_model`` with ``"stream": true``), in OpenAI's chunk format:

    data: {"object": "chat.completion.chunk", "choices": [{"delta": {"content": "Hel"}, ...}]}
    ...
    data: {... "choices": [{"delta": {}, "finish_reason": "stop"}]}
    data: {... "choices": [], "usage": {...}}          (when usage is asked for)
    data: [DONE]

Each delta is written as soon as the engine yields it. If the client goes
away, the WSGI server closes this iterator: the ``finally`` below stops the
model and records the call as cancelled.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from flask import Response, g

from ..engine.base import EngineError
from ..services.intent import CallIntent
from ..services.streaming import StreamingCall
from .context import note_usage, runtime
from .errors import error_body, rate_headers, request_dialect, service_error
from .protocol import SSE_DONE, ChunkFormat, sse
from .wire import Last

log = logging.getLogger(__name__)

SSE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # ask nginx-style proxies not to buffer the stream
}


def events(call: StreamingCall, fmt: ChunkFormat, *, include_usage: bool, dialect: str,
           state: Any = None) -> Iterator[str]:
    """The SSE lines of a stream; closing the iterator early cancels the call.
    ``state``: the request's ``g``, for the access log line's usage.

    Events that are ready together leave together, as one write: the start with
    the first delta (the call comes primed with it), and the final event with
    the usage and ``[DONE]``. Each is still written before the model is asked
    for more, so no event waits for a later one; there are just fewer writes and
    fewer wake-ups of the client (3 segments fewer for a one-token reply)."""
    ended = False
    ready: list[str] = []  # events made since the last write
    try:
        start = fmt.start()
        if start is not None:
            ready.append(sse(start))
        held = ""  # a tool-calling reply that may be a call waits for its end
        for piece in call:
            if fmt.holds_back(held + piece):
                held += piece
            else:
                ready.append(fmt.delta_event(held + piece))
                held = ""
            if ready:
                yield "".join(ready)
                ready = []
        result = call.result
        assert result is not None
        calls = fmt.tool_calls(held) if held else None
        if calls is not None:
            ready.append(sse(calls))
        elif held:
            ready.append(fmt.delta_event(held))
        ready.append(sse(fmt.final(result, called=calls is not None)))
        if include_usage:
            ready.append(sse(fmt.usage(result)))
        ended = True
        yield Last("".join(ready) + SSE_DONE)
    except EngineError as exc:
        # headers are gone: report in-stream, in the route's error dialect (the
        # call is already recorded as failed and refunded)
        ended = True
        err = service_error(exc)
        ready.append(sse(error_body(err.status_code, (err.extra_data or {}).get("code") or "model_error",
                                    err.message, dialect=dialect)))
        yield Last("".join(ready) + SSE_DONE)
    finally:
        if not ended:
            log.info("stream cut short", extra={"call_id": str(call.call_id)})
            call.cancel("client disconnected")
        if state is not None and call.result is not None:
            note_usage(call.result, state)


class _Body:
    """The response iterable. Its ``close()`` (called by the WSGI server when the
    response ends or the client is gone) cancels the call even if iteration never
    began, which a bare generator's close() would not."""

    def __init__(self, gen: Iterator[str], call: StreamingCall):
        self._gen = gen
        self._call = call

    def __iter__(self) -> Iterator[str]:
        return self._gen

    def close(self) -> None:
        self._gen.close()
        self._call.cancel("client disconnected")


def stream_response(call: StreamingCall, *, chat: bool, include_usage: bool, dialect: str,
                    headers: dict[str, str], response_format: str | None = None) -> Response:
    """A 200 ``text/event-stream`` response for a started call."""
    fmt = ChunkFormat(call.call_id, call.model, chat=chat, response_format=response_format)
    body = _Body(events(call, fmt, include_usage=include_usage, dialect=dialect, state=g._get_current_object()),
                 call)
    return Response(body, status=200, mimetype="text/event-stream", headers={**SSE_HEADERS, **headers})


def start(intent: CallIntent, *, chat: bool, include_usage: bool) -> Response:
    """Admit a streamed call for the signed-in user and answer with its SSE stream
    (both blueprints' ``stream: true``)."""
    call = runtime().calls.stream(intent)
    g.stream_call_id = call.call_id  # what an Idempotency-Key remembers of a stream (api/idempotency.py)
    return stream_response(call, chat=chat, include_usage=include_usage, dialect=request_dialect(),
                           headers=rate_headers(call.quota, call.admission.state),
                           response_format=intent.request.params.response_format)
