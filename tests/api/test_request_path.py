"""The request path stays short: a model call reaches the engine three project
frames below its route, and its prompt is rendered and tokenized once.

The real model serves these calls; the engine's methods and the template
helpers are wrapped (they still run) only to see who called them and how often.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

import model_api

PACKAGE = Path(model_api.__file__).parent

pytestmark = pytest.mark.model

ROUTES = [
    ("/call_model", {"prompt": "Hi", "max_tokens": 2, "temperature": 0}, "call_model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0},
     "chat_completions"),
    ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 2, "temperature": 0}, "completions"),
]


def _project_frames_between(stack: list[inspect.FrameInfo], route: str) -> list[str]:
    """The package's frames from just below the route down to the engine's caller."""
    names = [(f.function, Path(f.filename)) for f in stack]
    top = next(i for i, (fn, path) in enumerate(names) if fn == route and path.is_relative_to(PACKAGE / "api"))
    # stack[0] is the spy; stack[1:top] are its callers below the route
    return [f"{path.name}:{fn}" for fn, path in names[1:top] if path.is_relative_to(PACKAGE)]


@pytest.fixture
def counted(app, monkeypatch):
    """The real default engine, with stream(), its template's render() and its
    tokenizer counted (they still run)."""
    engine = app.extensions["model_api"].engine
    seen: dict[str, list] = {"stream": [], "render": [], "tokenize": []}
    real_stream, real_render, real_tokenize = engine.stream, engine.template.render, engine.tokenizer.prompt

    def stream(prompt, cancel=None, **kw):
        seen["stream"].append(inspect.stack())
        return real_stream(prompt, cancel, **kw)

    def render(*a, **k):
        seen["render"].append(1)
        return real_render(*a, **k)

    def tokenize(*a, **k):
        seen["tokenize"].append(1)
        return real_tokenize(*a, **k)

    monkeypatch.setattr(engine, "stream", stream)
    monkeypatch.setattr(engine.template, "render", render)
    monkeypatch.setattr(engine.tokenizer, "prompt", tokenize)
    return seen


@pytest.mark.parametrize(("path", "body", "route"), ROUTES, ids=[r[0] for r in ROUTES])
def test_a_sync_call_reaches_the_engine_three_frames_below_its_route(client, make_user, counted, path, body, route):
    r = client.post(path, json=body, headers=make_user("alice"))
    assert r.status_code in (200, 201), r.json
    [stack] = counted["stream"]
    between = _project_frames_between(stack, route)
    assert len(between) <= 3, between


@pytest.mark.parametrize(("path", "body", "route"), ROUTES, ids=[r[0] for r in ROUTES])
def test_a_call_renders_and_tokenizes_its_prompt_once(client, make_user, counted, path, body, route):
    r = client.post(path, json=body, headers=make_user("alice"))
    assert r.status_code in (200, 201), r.json
    chat = "messages" in body or path == "/call_model"  # /v1/completions' raw prompt has no template
    assert len(counted["render"]) == (1 if chat else 0) and len(counted["tokenize"]) == 1


def test_a_streamed_call_renders_and_tokenizes_its_prompt_once(client, make_user, counted):
    r = client.post("/v1/chat/completions", headers=make_user("alice"), json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True})
    assert r.status_code == 200 and r.get_data(as_text=True).endswith("data: [DONE]\n\n")
    assert len(counted["render"]) == 1 and len(counted["tokenize"]) == 1
