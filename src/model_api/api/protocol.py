"""OpenAI's wire shapes, in one place: usage, finish reasons, completion bodies
and stream chunks (``/v1/*``, and ``/call_model`` with ``"stream": true``)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from ..engine import tools
from ..engine.base import Completion


def usage(prompt_tokens: int | None, completion_tokens: int, cached_tokens: int | None = None) -> dict[str, Any]:
    """The usage object. With ``cached_tokens`` (OpenAI's ``prompt_tokens_details``):
    prompt tokens the engine reused from an earlier prompt with the same start."""
    out: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                           "total_tokens": (prompt_tokens or 0) + completion_tokens}
    if cached_tokens is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


def usage_of(c: Completion) -> dict[str, Any]:
    return usage(c.prompt_tokens, c.completion_tokens, c.cached_tokens)


def finish_reason(reason: str) -> str:
    """OpenAI's values: our "cancelled" never reaches a client that is still there."""
    return reason if reason in ("stop", "length") else "stop"


def _id(call_id: uuid.UUID, chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + call_id.hex


def tool_call_ids(call_id: uuid.UUID) -> str:
    """The prefix of a call's tool call ids (the same on an idempotent replay)."""
    return call_id.hex[:12] + "_"


def completion_body(call_id: uuid.UUID, c: Completion, *, chat: bool,
                    response_format: str | None = None) -> dict[str, Any]:
    """A ``chat.completion`` or ``text_completion`` object; a reply to a request
    with ``tools`` that is a call comes as ``tool_calls`` (engine/tools.py)."""
    if chat:
        calls = tools.parse(c.text, response_format, tool_call_ids(call_id))
        message: dict[str, Any] = {"role": "assistant", "content": None if calls else c.text}
        if calls:
            message["tool_calls"] = calls
        choice = {"index": 0, "message": message, "logprobs": None,
                  "finish_reason": "tool_calls" if calls else finish_reason(c.finish_reason)}
    else:
        choice = {"index": 0, "text": c.text, "logprobs": None, "finish_reason": finish_reason(c.finish_reason)}
    return {"id": _id(call_id, chat), "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": c.model, "choices": [choice], "usage": usage_of(c),
            "system_fingerprint": None}


def sse(obj: Any) -> str:
    """One Server-Sent Event carrying ``obj`` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def _json_string(text: str) -> str:
    """``text`` as :func:`sse` writes a string."""
    return json.dumps(text, ensure_ascii=False)


_MARK = "\x00"  # a delta's text while its event's halves are built (any text would do)


class ChunkFormat:
    """Builds the chunk objects of one stream (chat or text completion)."""

    def __init__(self, call_id: uuid.UUID, model: str, *, chat: bool, response_format: str | None = None):
        self.chat = chat
        self.call_id = call_id
        self.response_format = response_format if chat and tools.is_tools(response_format) else None
        self.id = _id(call_id, chat)
        self.created = int(time.time())
        self.model = model
        self.object = "chat.completion.chunk" if chat else "text_completion"
        # Every delta's event is the same text around its content: built once here,
        # so each token costs the JSON of its text alone, not of the whole chunk
        # (which was 40 % of the request thread's Python per streamed token).
        # The content is the chunk's last string, so the marker's is split off last.
        head, _, tail = sse(self.delta(_MARK)).rpartition(_json_string(_MARK))
        self._delta_event = (head, tail)

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

    def delta_event(self, text: str) -> str:
        """``sse(self.delta(text))``, from the halves built once."""
        head, tail = self._delta_event
        return head + _json_string(text) + tail

    def final(self, c: Completion, called: bool = False) -> dict[str, Any]:
        self.model = c.model or self.model
        finish = "tool_calls" if called else finish_reason(c.finish_reason)
        return self._chunk([self._choice(None if self.chat else "", finish)])

    def holds_back(self, text_so_far: str) -> bool:
        """Whether a tool-calling stream must keep its text until the end: it may
        be a call (it starts like one), which is sent whole as ``tool_calls``."""
        return self.response_format is not None and text_so_far.lstrip()[:1] in ("", "{", "[")

    def tool_calls(self, text: str) -> dict[str, Any] | None:
        """The chunk carrying a held-back reply's calls (None: it was text after all)."""
        calls = tools.parse(text, self.response_format, tool_call_ids(self.call_id))
        if not calls:
            return None
        delta = {"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]}
        return self._chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])

    def usage(self, c: Completion) -> dict[str, Any]:
        return self._chunk([], usage=usage_of(c))


#: OpenAI request fields this service cannot honour, each with the values that ask
#: for nothing (accepted). Anything else is refused (400 ``unsupported_parameter``)
#: rather than silently dropped; fields that change nothing we do (``user``,
#: ``metadata``, ``store``, ``service_tier``, ``parallel_tool_calls``) are accepted.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "web_search_options": (None,),
    "reasoning_effort": (None,),
}


def unsupported_parameter(body: Any, supported: tuple[str, ...] = ()) -> str | None:
    """The first field of a /v1 request body that asks for something we cannot do
    (``supported``: fields of the table the route does handle)."""
    if not isinstance(body, dict):
        return None
    for name, accepted in UNSUPPORTED.items():
        if name in body and name not in supported and body[name] not in accepted:
            return name
    return None
