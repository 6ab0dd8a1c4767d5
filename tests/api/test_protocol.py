"""The stream's wire shapes (api/protocol.py)."""

from __future__ import annotations

import json
import uuid

import pytest

from model_api.api.protocol import ChunkFormat, sse

TEXTS = ["Hello", " world", "", 'say "hi"', "back\\slash", "\x00", "\n\t\r", "é漢字🙂", "\u2028", "\x00\x00"]


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "text"])
@pytest.mark.parametrize("model", ["SmolLM2", "\x00", 'a "quoted" model'])
@pytest.mark.parametrize("text", TEXTS)
def test_a_delta_event_is_the_delta_chunk_as_an_event(chat, model, text):
    fmt = ChunkFormat(uuid.uuid4(), model, chat=chat)
    event = fmt.delta_event(text)
    assert event == sse(fmt.delta(text))
    chunk = json.loads(event.removeprefix("data: "))
    assert (chunk["choices"][0]["delta"]["content"] if chat else chunk["choices"][0]["text"]) == text
    assert chunk["model"] == model
