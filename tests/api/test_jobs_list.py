"""GET /jobs: a user's async jobs, newest first, filtered by state, cursor-paginated."""

from __future__ import annotations

import uuid

import pytest

HELLO = {"prompt": "Say hello.", "max_tokens": 2, "temperature": 0}


class HoldingQueue:
    """Keeps jobs queued: the list's states are then the test's to decide."""

    def enqueue(self, job_id: str) -> None:
        pass


@pytest.fixture
def held(make_app):
    app = make_app(default_quota=10)
    app.extensions["model_api"]._job_queue = HoldingQueue()
    return app.test_client()


def submit(client, headers, n: int) -> list[str]:
    return [client.post("/async_call_model", json=HELLO, headers=headers).json["job_id"] for _ in range(n)]


def jobs(client, headers, **query) -> dict:
    r = client.get("/jobs", query_string=query, headers=headers)
    assert r.status_code == 200, r.json
    return r.json


def test_the_list_is_newest_first_and_pages_with_next_before_until_null(held, make_user):
    headers = make_user("alice")
    ids = submit(held, headers, 5)
    seen, before = [], None
    while True:
        page = jobs(held, headers, limit=2, **({"before": before} if before else {}))
        seen += [j["job_id"] for j in page["jobs"]]
        before = page["next_before"]
        if before is None:
            break
    assert seen == list(reversed(ids))


def test_each_job_has_the_status_fields_of_async_call_status(held, make_user):
    headers = make_user("alice")
    (job,) = submit(held, headers, 1)
    (listed,) = jobs(held, headers)["jobs"]
    assert listed == held.get(f"/async_call_status?job_id={job}", headers=headers).json
    assert listed["job_status"] == "processing" and listed["state"] == "queued"


@pytest.mark.parametrize("state,expected", [("queued", ["q"]), ("processing", ["q"]), ("cancelled", ["c"]),
                                            ("completed", []), ("failed", [])])
def test_state_filters_by_the_detailed_or_the_seeds_state(held, make_user, state, expected):
    headers = make_user("alice")
    c, q = submit(held, headers, 2)
    assert held.post("/async_call_cancel", json={"job_id": c}, headers=headers).status_code == 200
    names = {c: "c", q: "q"}
    assert [names[j["job_id"]] for j in jobs(held, headers, state=state)["jobs"]] == expected


def test_only_your_async_jobs_are_listed(held, make_user):
    alice, bob = make_user("alice"), make_user("bob")
    mine = submit(held, alice, 1)
    submit(held, bob, 2)
    assert [j["job_id"] for j in jobs(held, alice)["jobs"]] == mine
    assert jobs(held, alice, before=str(uuid.uuid4()))["jobs"] == []  # someone else's (or no) cursor: empty


def test_sync_calls_are_not_jobs(client, make_user):
    headers = make_user("alice")
    assert client.post("/call_model", json=HELLO, headers=headers).status_code == 201
    assert jobs(client, headers) == {"jobs": [], "next_before": None}


@pytest.mark.parametrize("query,field", [({"state": "done"}, "state"), ({"limit": 0}, "limit"),
                                         ({"limit": 101}, "limit"), ({"limit": "x"}, "limit"),
                                         ({"before": "not-a-uuid"}, "before")])
def test_bad_queries_are_400_naming_the_field(client, make_user, query, field):
    r = client.get("/jobs", query_string=query, headers=make_user("alice"))
    assert r.status_code == 400 and field in r.json["error"]["details"], r.json


def test_the_list_needs_credentials(client):
    assert client.get("/jobs").status_code == 401
