"""Many models over real HTTP: a gunicorn process serving two ids of the real
SmolLM2 model from a MODELS_FILE, the official ``openai`` SDK as the client
(structured output at temperature 1.0), and a second service process whose
models file points one id at the first over HTTP."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import jsonschema
import openai
import pytest
import requests
from sqlalchemy import select

from model_api.models import Call, User
from model_api.services import api_keys
from model_api.services import auth as auth_service

from ..conftest import DEFAULT_PASSWORD, basic
from .test_openai_live import Server, sdk, start_server

pytestmark = [pytest.mark.model, pytest.mark.slow]

UPSTREAM_MODELS = """\
default: smol
models:
  smol:
    backend: batching
    n_ctx: 1024
    n_parallel: 8
  smol-short:
    backend: llama
    n_ctx: 512
    defaults: {temperature: 0, max_tokens: 6}
"""

# short to generate (about 25 tokens): 50 of them on a shared 2-core machine
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 10},
        "age": {"type": "integer"},
        "colour": {"enum": ["red", "green", "blue"]},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 2},
        "retired": {"type": "boolean"},
    },
    "required": ["name", "age", "colour", "pets", "retired"],
    "additionalProperties": False,
}


WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "The time in a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string", "maxLength": 20}},
                                               "required": ["city"], "additionalProperties": False}}}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def valid_calls(message) -> list[str]:
    """The names of an SDK message's tool calls, each one's arguments checked against its function's schema."""
    assert message.content is None and message.tool_calls
    for call in message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return [call.function.name for call in message.tool_calls]


def write(tmp, name: str, text: str) -> str:
    path = tmp / name
    path.write_text(textwrap.dedent(text))
    return str(path)


@pytest.fixture(scope="module")
def upstream(db_url, tmp_path_factory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("models-live")
    s = start_server(db_url, tmp / "upstream.log", MODELS_FILE=write(tmp, "models.yaml", UPSTREAM_MODELS))
    yield s
    s.stop()


@pytest.fixture
def key(database) -> str:
    with database.session() as s:
        user = auth_service.create_user(s, "alice", DEFAULT_PASSWORD, quota=100)
        return api_keys.create_key(s, user, "sdk").key


def calls(database, username: str = "alice") -> list[Call]:
    """This test's user's calls (other suites' live servers may share the database)."""
    with database.session() as s:
        return list(s.scalars(select(Call).join(User).where(User.username == username).order_by(Call.created_at)))


def test_fifty_json_schema_replies_at_temperature_one_all_parse_and_validate(upstream, key, database):
    # eight at a time (the batching engine's n_parallel); patient, as the machine may be busy
    client = openai.OpenAI(base_url=upstream.url + "/v1", api_key=key, max_retries=0, timeout=900)

    def ask(i: int):
        return client.chat.completions.create(
            model="smol", temperature=1.0, max_tokens=80, seed=i,
            messages=[{"role": "user", "content": "Invent a person."}],
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, range(50)))
    texts = [r.choices[0].message.content for r in replies]
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON)
    assert all(r.choices[0].finish_reason == "stop" for r in replies)  # the grammar ended each, not max_tokens
    assert len(set(texts)) > 10  # temperature 1.0: the grammar constrains, it does not fix, the content
    assert {(c.model_id, c.status) for c in calls(database)} == {("smol", "completed")}


def test_tool_calls_through_the_sdk_always_carry_valid_arguments(upstream, key):
    client = openai.OpenAI(base_url=upstream.url + "/v1", api_key=key, max_retries=0, timeout=900)

    def ask(i: int):
        choice = "required" if i % 2 else {"type": "function", "function": {"name": "get_time"}}
        reply = client.chat.completions.create(
            model="smol", temperature=1.0, max_tokens=60, seed=i, tools=TOOLS, tool_choice=choice,
            messages=[{"role": "user", "content": "What is the weather like in Rome?"}])
        return choice, reply.choices[0]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(16)))
    for choice, answer in answers:
        names = valid_calls(answer.message)
        assert answer.finish_reason == "tool_calls"
        if choice != "required":
            assert names == ["get_time"]


def test_langchain_structured_output_and_bound_tools_work_against_v1(upstream, key):
    from langchain_core.messages import ToolMessage
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        """Someone invented."""

        name: str = Field(max_length=10)
        colour: str = Field(json_schema_extra={"enum": ["red", "green", "blue"]})

    llm = ChatOpenAI(base_url=upstream.url + "/v1", api_key=key, model="smol", temperature=1.0, max_tokens=60,
                     max_retries=0, timeout=600)
    for _ in range(3):
        person = llm.with_structured_output(Person).invoke("Invent a person.")
        assert isinstance(person, Person) and person.colour in ("red", "green", "blue")

    def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
        """The weather in a city, in celsius or fahrenheit."""
        return "sunny"

    # the grammar makes the reply a call, but at temperature 1.0 an unbounded string
    # (the city) can run past a small max_tokens (1 in 40 at 60 tokens): the reply is
    # then the truncated text with finish_reason "length", as it should be
    with_tools = llm.model_copy(update={"max_tokens": 200}).bind_tools([get_weather], tool_choice="get_weather")
    ai = with_tools.invoke("Weather in Oslo?")
    assert len(ai.tool_calls) == 1, (ai.content, ai.response_metadata)
    (call,) = ai.tool_calls
    assert call["name"] == "get_weather" and set(call["args"]) == {"city", "unit"}
    # the agent loop's next turn: the tool's answer goes back in a `tool` message
    final = llm.bind_tools([get_weather]).invoke(
        ["Weather in Oslo?", ai, ToolMessage(content="sunny, 20 degrees", tool_call_id=call["id"])])
    assert final.content or final.tool_calls


def test_the_sdk_lists_and_retrieves_models_and_sees_a_404_for_an_unknown_one(upstream, key):
    client = sdk(upstream, key)
    listed = {m.id: m for m in client.models.list().data}
    assert set(listed) == {"smol", "smol-short"}
    assert (listed["smol"].context_length, listed["smol"].backend) == (1024, "batching")
    assert client.models.retrieve("smol-short").context_length == 512
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    assert missing.value.body["code"] == "model_not_found"


def test_a_front_instance_serves_the_first_as_one_of_its_models(upstream, database, tmp_path):
    with database.session() as s:
        relay = auth_service.create_user(s, "relay", DEFAULT_PASSWORD, quota=10)
        relay_key = api_keys.create_key(s, relay, "front").key
        auth_service.create_user(s, "dave", DEFAULT_PASSWORD, quota=5)
    front_models = write(tmp_path, "front.yaml", f"""\
        default: local
        models:
          local:
            backend: llama
            n_ctx: 512
          remote:
            backend: openai
            base_url: {upstream.url}/v1
            api_key_env: UPSTREAM_KEY
            upstream_model: smol-short
            n_ctx: 512
        """)
    front = start_server(database.url, tmp_path / "front.log", MODELS_FILE=front_models, UPSTREAM_KEY=relay_key)
    try:
        r = requests.post(front.url + "/call_model", json={"prompt": "Hi", "model": "remote"},
                          headers=basic("dave"), timeout=120)
        assert r.status_code == 201, r.text
        listed = requests.get(front.url + "/v1/models", headers=basic("dave"), timeout=30).json()["data"]
        assert [(m["id"], m["backend"], m["owned_by"]) for m in listed] == [
            ("local", "llama", "model-api"), ("remote", "openai", "127.0.0.1")]
        with database.session() as s:
            by_user = {name: (model_id, tokens) for name, model_id, tokens in s.execute(
                select(User.username, Call.model_id, Call.completion_tokens).join(Call)).all()}
        # one row on each side: the front's names its id, the upstream's the id it was asked for,
        # and the front bills the tokens the upstream reports
        tokens = r.json()["usage"]["completion_tokens"]
        assert by_user == {"dave": ("remote", tokens), "relay": ("smol-short", tokens)}
        # tools pass through to the upstream, whose grammar makes the call; it comes back as tool_calls
        client = openai.OpenAI(base_url=front.url + "/v1", api_key="unused", max_retries=0, timeout=300,
                               default_headers=basic("dave"))
        reply = client.chat.completions.create(model="remote", max_tokens=60, tool_choice="required", tools=TOOLS,
                                               messages=[{"role": "user", "content": "Weather in Oslo?"}])
        assert valid_calls(reply.choices[0].message) and reply.choices[0].finish_reason == "tool_calls"
    finally:
        front.stop()
