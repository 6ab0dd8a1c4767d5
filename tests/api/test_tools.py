"""Tool calling on /v1/chat/completions with the real SmolLM2 model, on both local
engines: a grammar makes every call name an offered function with arguments
valid for its schema; ``role: "tool"`` turns are accepted; what cannot be
enforced is a 400 naming the field, with nothing charged or written."""

from __future__ import annotations

import json

import jsonschema
import pytest

from .test_models import client, models_file, rows, used  # noqa: F401  (fixtures: two local models)

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": ADD}},
]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def deep(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"x": schema}, "required": ["x"]}
    return schema


def chat(client, headers, **body):
    return client.post("/v1/chat/completions", headers=headers,
                       json={"messages": ASK, "tools": TOOLS, "max_tokens": 60, "temperature": 1.0, **body})


def valid_calls(message: dict) -> list[tuple[str, dict]]:
    """The message's calls as (name, arguments), each checked against its function's schema."""
    out = []
    for call in message["tool_calls"]:
        assert call["type"] == "function" and call["id"].startswith("call_")
        args = json.loads(call["function"]["arguments"])
        jsonschema.validate(args, SCHEMAS[call["function"]["name"]])
        out.append((call["function"]["name"], args))
    return out


@pytest.mark.parametrize("model", ["short", "long"])  # the batching and the serialised engine
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_required_tool_choice_always_returns_a_valid_call(client, make_user, database, model, seed):
    r = chat(client, make_user("alice"), model=model, tool_choice="required", seed=seed)
    assert r.status_code == 200, r.json
    choice = r.json["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert len(valid_calls(choice["message"])) == 1
    (row,) = rows(database)  # the call as the model wrote it, and the tools it was offered
    assert json.loads(row.response)["name"] == choice["message"]["tool_calls"][0]["function"]["name"]
    assert json.loads(row.params["response_format"])["tools"] == TOOLS


def test_a_named_function_is_the_one_called(client, make_user):
    r = chat(client, make_user("alice"), tool_choice={"type": "function", "function": {"name": "add"}})
    assert r.status_code == 200, r.json
    ((name, args),) = valid_calls(r.json["choices"][0]["message"])
    assert name == "add" and set(args) == {"a", "b"}


@pytest.mark.parametrize("question", ["What is the weather in Paris?", "Write a haiku about the sea."])
def test_auto_lets_the_model_answer_in_text_or_with_a_valid_call(client, make_user, question):
    r = chat(client, make_user("alice"), messages=[{"role": "user", "content": question}], seed=7)
    assert r.status_code == 200, r.json
    choice = r.json["choices"][0]
    if choice["message"].get("tool_calls"):
        assert choice["finish_reason"] == "tool_calls" and valid_calls(choice["message"])
    else:
        assert choice["finish_reason"] in ("stop", "length") and choice["message"]["content"]
        assert not choice["message"]["content"].lstrip().startswith("{")  # never half a call


def test_a_streamed_call_arrives_as_a_tool_calls_delta(client, make_user):
    r = chat(client, make_user("alice"), tool_choice="required", stream=True)
    assert r.status_code == 200
    events = [json.loads(line[6:]) for line in r.get_data(as_text=True).splitlines()
              if line.startswith("data: {")]
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert len(calls) == 1 and calls[0][0]["index"] == 0
    assert valid_calls({"tool_calls": [{k: v for k, v in calls[0][0].items() if k != "index"}]})
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert not any(d.get("content") for d in deltas)  # the call's JSON is not also sent as text


def test_a_conversation_with_a_tool_result_is_answered(client, make_user, database):
    messages = [*ASK,
                {"role": "assistant", "content": None, "tool_calls": [{
                    "id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"}]
    r = chat(client, make_user("alice"), messages=messages, tool_choice="none", temperature=0, max_tokens=8)
    assert r.status_code == 200, r.json
    assert r.json["choices"][0]["message"]["content"]
    (row,) = rows(database)
    # the stored conversation is what the model read: the call as text, the result as a turn
    assert [m["role"] for m in row.messages] == ["user", "assistant", "user"]
    assert "get_weather" in row.messages[1]["content"] and "18 degrees" in row.messages[2]["content"]


@pytest.mark.parametrize("body, param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}}}]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
    ({"tools": [TOOLS[1], TOOLS[1]]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f\x00"}}]}, "tools"),  # unstorable text
    ({"tools": [{"type": "function", "function": {"name": "f", "description": "\ud800"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": deep(100)}}]}, "tools"),
])
def test_tools_we_cannot_enforce_are_a_400_naming_the_field(client, make_user, database, body, param):
    r = chat(client, make_user("alice"), **body)
    assert r.status_code == 400 and r.json["error"]["param"] == param, r.json
    assert rows(database) == [] and used(database) == 0


@pytest.mark.parametrize("message", [
    {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f"}}]},  # no arguments
    {"role": "assistant", "tool_calls": "call"},
])
def test_malformed_tool_turns_are_a_400(client, make_user, database, message):
    r = chat(client, make_user("alice"), messages=[*ASK, message])
    assert r.status_code == 400, r.json
    assert rows(database) == []
