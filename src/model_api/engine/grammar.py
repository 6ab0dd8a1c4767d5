"""Structured output for local models: OpenAI's ``response_format`` as a
llama.cpp grammar (GBNF) that constrains sampling, so the reply always parses
as JSON and, for ``json_schema``, matches the schema.

``response_format`` travels with the request as canonical JSON text
(``SamplingParams.response_format``): it is stored with the call row, an async
job is rebuilt from it, a remote upstream receives it as sent, and a local
engine compiles it here (once per distinct format, cached).

llama-cpp-python's schema converter (``json_schema_to_gbnf``) cannot express
every JSON Schema keyword: a schema using one it would silently ignore (numeric
bounds, ``uniqueItems``, ``not``...) is refused up front rather than answered
with JSON that may not match it.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

#: keywords the grammar cannot enforce: a schema using one is refused (400)
UNENFORCEABLE = frozenset({
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "uniqueItems",
    "minProperties", "maxProperties", "not", "if", "then", "else", "patternProperties",
    "dependentRequired", "dependentSchemas", "propertyNames", "contains", "minContains", "maxContains",
    "unevaluatedProperties", "unevaluatedItems",
})


class GrammarError(ValueError):
    """A response_format that cannot become a grammar; ``field`` is where (for a 400)."""

    def __init__(self, message: str, field: str = "response_format"):
        super().__init__(message)
        self.field = field


def canonical(response_format: dict[str, Any] | None) -> str | None:
    """The request's ``response_format`` as stored and compiled (None: free text).

    Checks its shape and, for ``json_schema``, that the schema can be enforced;
    raises GrammarError otherwise."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise GrammarError("response_format must be an object with a `type`")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json.dumps({"type": "json_object"})
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise GrammarError("response_format.json_schema.schema must be a JSON Schema object",
                               "response_format.json_schema")
        refuse_unenforceable(spec["schema"], "response_format.json_schema.schema")
        text = json.dumps({"type": "json_schema", "json_schema": spec}, sort_keys=True, separators=(",", ":"))
        gbnf(text)  # compiles (and is cached for the engine), or says why not
        return text
    raise GrammarError("response_format.type must be one of 'text', 'json_object', 'json_schema'",
                       "response_format.type")


def refuse_unenforceable(schema: Any, where: str, field: str = "response_format.json_schema") -> None:
    """Raise GrammarError (naming ``field``) if ``schema`` uses a keyword the grammar cannot enforce."""
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key in ("enum", "const", "default", "examples", "description", "title"):
                continue  # values, not schemas
            if key in UNENFORCEABLE:
                raise GrammarError(f"{where}: the keyword {key!r} cannot be enforced while sampling; remove it",
                                   field)
            # a property may be *named* like a keyword: only its schema is checked
            if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
                for name, sub in value.items():
                    refuse_unenforceable(sub, f"{where}.{key}.{name}", field)
            else:
                refuse_unenforceable(value, f"{where}.{key}", field)
    elif isinstance(schema, list):
        for i, item in enumerate(schema):
            refuse_unenforceable(item, f"{where}[{i}]", field)


@lru_cache(maxsize=256)
def gbnf(response_format: str) -> str:
    """The GBNF grammar of a canonical response_format (root rule ``root``)."""
    from llama_cpp import llama_grammar

    spec = json.loads(response_format)
    if spec["type"] == "json_object":
        return llama_grammar.JSON_GBNF
    if spec["type"] == "tools":
        return _tools_gbnf(spec)
    try:
        return _strict_strings(llama_grammar.json_schema_to_gbnf(json.dumps(spec["json_schema"]["schema"])))
    except Exception as exc:  # the converter asserts on what it does not know
        raise GrammarError(f"response_format.json_schema.schema cannot be turned into a grammar: {exc}",
                           "response_format.json_schema") from None


def _strict_strings(gbnf_text: str) -> str:
    """The converter's string character rule admits raw control characters
    (``[^"\\]``), which JSON forbids inside strings: a reply could then fail to
    parse. Exclude them, as llama.cpp's own JSON grammar does."""
    return "\n".join(line.replace(r'[^"\\]', r'[^"\\\x7F\x00-\x1F]', 1) if line.startswith("char ::=") else line
                     for line in gbnf_text.splitlines())


def call_schema(spec: dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema of one tool call the model may make (engine/tools.py):
    ``{"name": <an offered function, or the named one>, "arguments": <its parameters>}``."""
    allowed = [f for f in spec["functions"] if spec["choice"] in ("auto", "required", f["name"])]
    options = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]}} for f in allowed]
    return options[0] if len(options) == 1 else {"anyOf": options}


#: "auto": a call, or text that does not start like one (the first character
#: decides, so a reply is never half text, half call)
_TEXT_OR_CALL = 'root ::= call | text\ntext ::= [^{ \\t\\n] [^\\x00]*\n'


def _tools_gbnf(spec: dict[str, Any]) -> str:
    from llama_cpp import llama_grammar

    try:
        call = _strict_strings(llama_grammar.json_schema_to_gbnf(json.dumps(call_schema(spec))))
    except Exception as exc:
        raise GrammarError(f"a function's parameters cannot be turned into a grammar: {exc}", "tools") from None
    if spec["choice"] != "auto":
        return call
    # the converter names its start rule `root`; here it is one alternative of two
    renamed = "\n".join("call ::=" + line[len("root ::="):] if line.startswith("root ::=") else line
                         for line in call.splitlines())
    return _TEXT_OR_CALL + renamed
