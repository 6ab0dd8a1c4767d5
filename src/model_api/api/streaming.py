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

import json
import logging
import time
from collections.abc import Iterator
from typing import Any

from flask import Response

from ..engine.base import Completion, EngineError
from ..services.calls import StreamingCall
from .errors import error_body, service_error

log = logging.getLogger(__name__)

SSE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # ask nginx-style proxies not to buffer the stream
}


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def usage_of(c: Completion) -> dict[str, Any]:
    """OpenAI's usage object; ``cached_tokens``: prompt tokens the engine did not
    have to compute (reused from an earlier prompt with the same start)."""
    return {
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "total_tokens": c.prompt_tokens + c.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": c.cached_tokens},
    }


def finish_reason(reason: str) -> str:
    """OpenAI's values: our "cancelled" never reaches a client that is still there."""
    return reason if reason in ("stop", "length") else "stop"


class ChunkFormat:
    """Builds the chunk objects of one stream (chat or text completion)."""

    def __init__(self, call: StreamingCall, *, chat: bool):
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + call.call_id.hex
        self.created = int(time.time())
        self.model = call.model
        self.object = "chat.completion.chunk" if chat else "text_completion"

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def _choice(self, text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

    def start(self) -> dict[str, Any] | None:
        # OpenAI opens a chat stream with the assistant's role and empty content
        return self._chunk([self._choice("", None, role=True)]) if self.chat else None

    def delta(self, text: str) -> dict[str, Any]:
        return self._chunk([self._choice(text, None)])

    def final(self, c: Completion) -> dict[str, Any]:
        self.model = c.model or self.model
        return self._chunk([self._choice(None if self.chat else "", finish_reason(c.finish_reason))])

    def usage(self, c: Completion) -> dict[str, Any]:
        return self._chunk([], usage=usage_of(c))


def events(call: StreamingCall, fmt: ChunkFormat, *, include_usage: bool, path: str) -> Iterator[str]:
    """The SSE lines of a stream; closing the iterator early cancels the call."""
    ended = False
    try:
        start = fmt.start()
        if start is not None:
            yield sse(start)
        for piece in call:
            yield sse(fmt.delta(piece))
        result = call.result
        assert result is not None
        yield sse(fmt.final(result))
        if include_usage:
            yield sse(fmt.usage(result))
        ended = True
        yield "data: [DONE]\n\n"
    except EngineError as exc:
        # headers are gone: report in-stream, in the route's error shape (the call
        # is already recorded as failed and refunded)
        ended = True
        err = service_error(exc)
        yield sse(error_body(err.status_code, (err.extra_data or {}).get("code") or "model_error",
                             err.message, path=path))
        yield "data: [DONE]\n\n"
    finally:
        if not ended:
            log.info("stream cut short", extra={"call_id": str(call.call_id)})
            call.cancel("client disconnected")


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


def stream_response(call: StreamingCall, *, chat: bool, include_usage: bool, path: str,
                    headers: dict[str, str]) -> Response:
    """A 200 ``text/event-stream`` response for a started call."""
    body = _Body(events(call, ChunkFormat(call, chat=chat), include_usage=include_usage, path=path), call)
    return Response(body, status=200, mimetype="text/event-stream", headers={**SSE_HEADERS, **headers})
