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
        _refuse_unenforceable(spec["schema"], "response_format.json_schema.schema")
        text = json.dumps({"type": "json_schema", "json_schema": spec}, sort_keys=True, separators=(",", ":"))
        gbnf(text)  # compiles (and is cached for the engine), or says why not
        return text
    raise GrammarError("response_format.type must be one of 'text', 'json_object', 'json_schema'",
                       "response_format.type")


def _refuse_unenforceable(schema: Any, where: str) -> None:
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key in ("enum", "const", "default", "examples", "description", "title"):
                continue  # values, not schemas
            if key in UNENFORCEABLE:
                raise GrammarError(f"{where}: the keyword {key!r} cannot be enforced while sampling; remove it",
                                   "response_format.json_schema")
            # a property may be *named* like a keyword: only its schema is checked
            if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
                for name, sub in value.items():
                    _refuse_unenforceable(sub, f"{where}.{key}.{name}")
            else:
                _refuse_unenforceable(value, f"{where}.{key}")
    elif isinstance(schema, list):
        for i, item in enumerate(schema):
            _refuse_unenforceable(item, f"{where}[{i}]")


@lru_cache(maxsize=256)
def gbnf(response_format: str) -> str:
    """The GBNF grammar of a canonical response_format (root rule ``root``)."""
    from llama_cpp import llama_grammar

    spec = json.loads(response_format)
    if spec["type"] == "json_object":
        return llama_grammar.JSON_GBNF
    try:
        return llama_grammar.json_schema_to_gbnf(json.dumps(spec["json_schema"]["schema"]))
    except Exception as exc:  # the converter asserts on what it does not know
        raise GrammarError(f"response_format.json_schema.schema cannot be turned into a grammar: {exc}",
                           "response_format.json_schema") from None
