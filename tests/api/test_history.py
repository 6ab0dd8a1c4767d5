"""GET /calls: a user's own history, paginated, nobody else's."""

from ..conftest import basic


def test_history_lists_own_calls_newest_first_with_pages(client, make_user):
    alice, bob = make_user("alice", quota=10), make_user("bob")
    prompts = ["first question", "second question", "third question"]
    for p in prompts:
        assert client.post("/call_model", json={"prompt": p, "max_tokens": 2}, headers=alice).status_code == 201
    client.post("/call_model", json={"prompt": "bob's secret", "max_tokens": 2}, headers=bob)

    page1 = client.get("/calls?limit=2", headers=alice)
    assert page1.status_code == 200
    assert [c["prompt"] for c in page1.json["calls"]] == ["third question", "second question"]
    assert all(c["response"] and c["state"] == "completed" and c["usage"]["completion_tokens"] >= 1
               for c in page1.json["calls"])
    page2 = client.get(f"/calls?limit=2&before={page1.json['next_before']}", headers=alice).json
    assert [c["prompt"] for c in page2["calls"]] == ["first question"]
    assert page2["next_before"] is None
    everything = client.get("/calls?limit=100", headers=alice).get_data(as_text=True)
    assert "bob's secret" not in everything
    # another user's id as a cursor reveals nothing
    bob_id = client.get("/calls", headers=bob).json["calls"][0]["id"]
    assert client.get(f"/calls?before={bob_id}", headers=alice).json["calls"] == []


def test_history_errors(client, make_user):
    alice = make_user("alice")
    assert client.get("/calls").status_code == 401
    assert client.get("/calls", headers=basic("alice", "nope nope")).status_code == 401
    assert client.get("/calls?limit=0", headers=alice).status_code == 400
    assert client.get("/calls?limit=abc", headers=alice).status_code == 400
    assert client.get("/calls?before=not-a-uuid", headers=alice).status_code == 400


def test_timestamps_carry_their_utc_offset(client, make_user):
    alice = make_user("alice")
    client.post("/call_model", json={"prompt": "Hi", "max_tokens": 1}, headers=alice)
    call = client.get("/calls", headers=alice).json["calls"][0]
    assert call["created_at"].endswith("+00:00") and call["finished_at"].endswith("+00:00")
