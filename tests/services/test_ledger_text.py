"""What a model answers is kept even when it is not text every database takes
(PostgreSQL refuses NUL in text and Python's encoder an unpaired surrogate)."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from model_api.engine.base import Completion, GenerationRequest, SamplingParams
from model_api.models import Call, CallStatus, User
from model_api.services.ledger import record_failure, storable_name, storable_text

from ..fakes import FakeEngine, intent_for, model_calls

REQ = GenerationRequest.single_prompt("hi there", SamplingParams(max_tokens=4))
UNSTORABLE = ["nul\x00inside", "lone \ud800 surrogate", "\udfff", "\x00"]


def _user_id(database, name: str = "alice") -> int:
    with database.session() as s:
        return s.scalar(select(User.id).where(User.username == name))


def _row(database, call_id) -> Call:
    with database.session() as s:
        return s.get(Call, call_id)


@pytest.mark.parametrize("reply", UNSTORABLE)
def test_a_reply_no_database_text_column_takes_is_kept_with_replacement_characters(make_user, database, reply):
    make_user("alice")
    outcome = model_calls(database, FakeEngine(reply=reply)).run(intent_for(_user_id(database), REQ))
    row = _row(database, outcome.call_id)
    assert row.status == CallStatus.COMPLETED.value
    assert row.response == storable_text(reply + " ") and "\x00" not in row.response
    assert row.response.encode("utf-8").decode("utf-8") == row.response  # valid Unicode text now


@pytest.mark.parametrize("reply", UNSTORABLE)
def test_a_partial_reply_of_a_failed_call_is_kept_the_same_way(make_user, database, reply):
    make_user("alice")
    engine = FakeEngine()
    call_id = model_calls(database, engine).run(intent_for(_user_id(database), REQ)).call_id
    with database.session() as s:  # back to running, as a call cut short would be
        s.get(Call, call_id).status = CallStatus.RUNNING.value
    assert record_failure(database, call_id, "client disconnected", refund=False, status=CallStatus.CANCELLED,
                          partial=Completion(reply, 3, 1, "cancelled", "fake"))
    assert _row(database, call_id).response == storable_text(reply)


@pytest.mark.parametrize("name", ["up\x00stream", "lone \udc80", "m" * 300, "é漢" * 200])
def test_a_model_name_the_model_column_refuses_is_kept_cut_and_replaced(make_user, database, name):
    # a remote upstream names its model as it likes: in its /models list (the row's
    # opening write) and in every reply (its final write)
    make_user("alice")
    engine = FakeEngine()
    engine.model_name = name
    outcome = model_calls(database, engine).run(intent_for(_user_id(database), REQ))
    row = _row(database, outcome.call_id)
    assert row.status == CallStatus.COMPLETED.value
    assert row.model == storable_name(name) and len(row.model) <= 255 and "\x00" not in row.model
    assert name.startswith(row.model) or "\ufffd" in row.model


@pytest.mark.parametrize("text, kept", [
    ("plain text, é漢字🙂", "plain text, é漢字🙂"),
    ("a\x00b", "a\ufffdb"),
    ("a\ud83db", "a\ufffdb"),
    ("\ud83d\ude00", "\ufffd\ufffd"),  # two halves as two code points: not one character
])
def test_storable_text_replaces_only_what_cannot_be_stored(text, kept):
    assert storable_text(text) == kept
