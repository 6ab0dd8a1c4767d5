"""response_format on both local engines: sampling constrained by a llama.cpp
grammar, so replies parse and match the schema even at temperature 1.0."""

from __future__ import annotations

import json

import jsonschema
import pytest

from model_api.engine import grammar
from model_api.engine.base import GenerationRequest, SamplingParams

pytestmark = pytest.mark.model

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer"},
        "colour": {"enum": ["red", "green", "blue"]},
        "pets": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "colour", "pets", "ok"],
    "additionalProperties": False,
}
SCHEMA = grammar.canonical({"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
JSON_OBJECT = grammar.canonical({"type": "json_object"})


def ask(engine, fmt: str | None, temperature: float, seed: int, max_tokens: int = 120,
        prompt: str = "Describe a person as JSON."):
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=1.0, seed=seed,
                            response_format=fmt)
    request = GenerationRequest.single_prompt(prompt, params)
    return engine.generate(engine.prepare(request))


@pytest.mark.parametrize("engine_name", ["llama_engine", "batching_engine"])
@pytest.mark.parametrize("seed", range(3))
def test_replies_match_the_schema_even_at_temperature_one(request, engine_name, seed):
    engine = request.getfixturevalue(engine_name)
    result = ask(engine, SCHEMA, 1.0, seed)
    assert result.finish_reason == "stop", result.text  # the grammar ended it, not max_tokens
    jsonschema.validate(json.loads(result.text), PERSON)


@pytest.mark.parametrize("engine_name", ["llama_engine", "batching_engine"])
def test_json_object_mode_replies_with_one_json_object(request, engine_name):
    # a prompt the small model answers briefly: asked to describe a person, its greedy
    # reply with the AVX-512 CPU backend repeats one address in an array until max_tokens
    result = ask(request.getfixturevalue(engine_name), JSON_OBJECT, 0.0, 1, max_tokens=200,
                 prompt='Reply with a JSON object with the key "name".')
    assert result.finish_reason == "stop", result.text  # the grammar closed the object
    assert isinstance(json.loads(result.text), dict), result.text


def test_both_engines_agree_greedily_under_the_grammar(llama_engine, batching_engine):
    assert ask(llama_engine, SCHEMA, 0.0, 1).text == ask(batching_engine, SCHEMA, 0.0, 1).text


@pytest.mark.parametrize("response_format, field, words", [
    ({"type": "xml"}, "response_format.type", "must be one of"),
    ({"type": "json_schema"}, "response_format.json_schema", "must be a JSON Schema object"),
    ({"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "integer", "minimum": 0}}},
     "response_format.json_schema", "'minimum' cannot be enforced"),
    ({"type": "json_schema", "json_schema": {"name": "n", "schema": {
        "type": "object", "properties": {"xs": {"type": "array", "uniqueItems": True}}}}},
     "response_format.json_schema", "schema.properties.xs: the keyword 'uniqueItems'"),
])
def test_a_format_the_grammar_cannot_enforce_is_refused_naming_where(response_format, field, words):
    with pytest.raises(grammar.GrammarError) as exc:
        grammar.canonical(response_format)
    assert exc.value.field == field and words in str(exc.value)


def test_a_property_named_like_a_keyword_is_fine():
    schema = {"type": "object", "properties": {"minimum": {"type": "integer"}}, "required": ["minimum"]}
    assert grammar.canonical({"type": "json_schema", "json_schema": {"name": "n", "schema": schema}})


def test_text_is_no_format_and_formats_are_stored_canonically():
    assert grammar.canonical({"type": "text"}) is None and grammar.canonical(None) is None
    a = grammar.canonical({"type": "json_schema", "json_schema": {"schema": {"type": "object"}, "name": "x"}})
    b = grammar.canonical({"json_schema": {"name": "x", "schema": {"type": "object"}}, "type": "json_schema"})
    assert a == b


def test_a_response_format_that_is_not_an_object_is_refused():
    with pytest.raises(grammar.GrammarError, match="must be an object"):
        grammar.canonical("json")
