"""Tool calling (OpenAI's ``tools`` / ``tool_choice``), one text format for every engine.

A tool call travels through the service as the reply's *text*, a JSON object
``{"name": ..., "arguments": {...}}`` (several calls: a JSON list of them), so
call rows, streams, idempotent replays and async jobs need nothing new:

- on a local model the request's ``response_format`` becomes ``{"type": "tools",
  ...}`` (:func:`canonical`), which :mod:`.grammar` compiles into a grammar that
  admits exactly such an object for one of the offered functions, with arguments
  valid for that function's JSON Schema (``"required"`` or a named function), or
  that object *or* plain text not starting with ``{`` (``"auto"``); the tools are
  described to the model in a system message (:func:`local_messages`), and tool
  turns of the conversation are rendered as text the chat template knows;
- a remote upstream gets ``tools`` and ``tool_choice`` as sent and its
  ``tool_calls`` are written back as the same text (:func:`calls_text`);
- the API turns the text back into OpenAI's ``tool_calls`` (:func:`parse`).
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from .grammar import GrammarError, gbnf, refuse_unenforceable

KIND = "tools"


def canonical(tools: Any, tool_choice: Any, *, enforce: bool = True) -> str | None:
    """The ``response_format`` text of a tool-calling request (None: no tools to
    call, as with ``tool_choice: "none"``). Raises GrammarError (a 400) naming the
    field that is wrong or (``enforce``: for a local model's grammar) cannot be enforced."""
    if tools in (None, []) or tool_choice == "none":
        return None
    if not isinstance(tools, list):
        raise GrammarError("tools must be a list of {\"type\": \"function\", \"function\": {...}}", "tools")
    functions: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise GrammarError("each tool must be {\"type\": \"function\", \"function\": {...}}", f"tools[{i}]")
        name = fn.get("name")
        if not isinstance(name, str) or not name or len(name) > 64:
            raise GrammarError("function.name must be a string of 1 to 64 characters", f"tools[{i}].function.name")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise GrammarError("function.parameters must be a JSON Schema object", f"tools[{i}].function.parameters")
        if enforce:
            refuse_unenforceable(params, f"tools[{i}].function.parameters", f"tools[{i}].function.parameters")
        functions.append({"name": name, "description": fn.get("description"), "parameters": params})
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise GrammarError("function names must be unique", "tools")
    if tool_choice in (None, "auto"):
        choice = "auto"
    elif tool_choice == "required":
        choice = "required"
    elif (isinstance(tool_choice, dict) and tool_choice.get("type") == "function"
          and isinstance(tool_choice.get("function"), dict)):
        choice = tool_choice["function"].get("name")
        if choice not in names:
            raise GrammarError(f"tool_choice names {choice!r}, which is not in tools", "tool_choice")
    else:
        raise GrammarError("tool_choice must be \"none\", \"auto\", \"required\" or "
                           "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
    text = json.dumps({"type": KIND, "tools": tools, "tool_choice": tool_choice, "choice": choice,
                       "functions": functions}, sort_keys=True, separators=(",", ":"))
    if enforce:
        gbnf(text)  # compiles (and is cached for the engine), or says why not
    return text


@lru_cache(maxsize=256)
def _spec(response_format: str | None) -> dict[str, Any] | None:
    """The tool spec of a canonical response_format (None: not a tool-calling one),
    parsed once: a streamed reply asks at its start, its end and for its body."""
    if response_format is None:
        return None
    spec = json.loads(response_format)
    return spec if spec.get("type") == KIND else None


def is_tools(response_format: str | None) -> bool:
    return _spec(response_format) is not None


def local_messages(messages: list[dict[str, Any]], response_format: str | None) -> list[dict[str, str]]:
    """The conversation as a chat template without tool support can render it:
    the tools described in a system message, assistant tool calls as their JSON
    text, tool results as user turns naming the call they answer."""
    spec = _spec(response_format)
    out: list[dict[str, str]] = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            content = calls_text(m["tool_calls"])
        elif role == "tool":
            role, content = "user", f"Result of tool call {m.get('tool_call_id') or ''}: {content}"
        out.append({"role": role, "content": content})
    if spec is not None:
        intro = _describe(spec)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + intro}
        else:
            out.insert(0, {"role": "system", "content": intro})
    return out


def _describe(spec: dict[str, Any]) -> str:
    lines = ["You can call these functions:"]
    for f in spec["functions"]:
        lines.append(f"- {f['name']}: {f.get('description') or ''} Arguments (JSON Schema): "
                     f"{json.dumps(f['parameters'], separators=(',', ':'))}")
    how = 'To call a function, reply with only {"name": <function name>, "arguments": {...}}.'
    if spec["choice"] == "auto":
        how += " Otherwise reply in plain text."
    lines.append(how)
    return "\n".join(lines)


def calls_text(tool_calls: list[dict[str, Any]]) -> str:
    """OpenAI ``tool_calls`` (arguments as JSON strings) as this module's text format."""
    calls = []
    for tc in tool_calls:
        fn = tc.get("function") or {}
        args = fn.get("arguments")
        try:
            args = json.loads(args) if isinstance(args, str) else (args or {})
        except ValueError:
            pass  # kept as the upstream sent it
        calls.append({"name": fn.get("name"), "arguments": args})
    return json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)


def parse(text: str, response_format: str | None, id_prefix: str) -> list[dict[str, Any]] | None:
    """OpenAI ``tool_calls`` if the reply to a tool-calling request is a call
    (None: it is plain text). Ids are ``call_<id_prefix><n>``: derived from the
    call's id, a replayed reply names its calls as the first answer did."""
    spec = _spec(response_format)
    if spec is None or not text.lstrip().startswith(("{", "[")):
        return None
    names = {f["name"] for f in spec["functions"]}
    try:
        value = json.loads(text)
    except ValueError:
        return None
    calls = value if isinstance(value, list) else [value]
    if not calls or not all(isinstance(c, dict) and c.get("name") in names for c in calls):
        return None
    return [{"id": f"call_{id_prefix}{i}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c.get("arguments", {}), ensure_ascii=False)}}
            for i, c in enumerate(calls)]
