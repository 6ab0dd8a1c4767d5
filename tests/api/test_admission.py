"""Admission control through the API: a full wait queue is 503 + Retry-After, nothing charged."""

import threading

from sqlalchemy import func, select

from model_api.models import Call, User


def test_full_queue_is_503_with_retry_after_and_charges_nothing(make_app, make_user, database):
    app = make_app(model_backend="batching", model_n_parallel=1, model_max_queue=1, default_quota=100)
    app.extensions["model_api"].engine  # load before the burst
    headers = make_user("alice")
    # verify the password once now, so the burst below reaches the engine together
    # instead of queueing on argon2 first
    assert app.test_client().get("/calls", headers=headers).status_code == 200
    results = []
    barrier = threading.Barrier(6)

    def call():
        client = app.test_client()
        barrier.wait()
        r = client.post("/call_model", json={"prompt": "Write a long story about a dragon who learns to read.",
                                                 "max_tokens": 64, "temperature": 0}, headers=headers)
        results.append((r.status_code, r.headers.get("Retry-After"), r.json))

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(code for code, _, _ in results)
    assert 201 in codes and 503 in codes, codes  # one slot + one waiting; the rest are turned away
    for code, retry_after, body in results:
        if code == 503:
            assert body["error"]["code"] == "model_busy"
            assert int(retry_after) >= 1
    with database.session() as s:
        used = s.scalar(select(User.used))
        charged = s.scalar(select(func.count(Call.id)).where(Call.charged.is_(True)))
        rows = s.scalar(select(func.count(Call.id)))
    # the engine refuses before the quota is charged: no unit used, no row written
    assert used == codes.count(201) == charged == rows


def test_out_of_quota_race_frees_the_started_sequence(make_app, make_user, database):
    """The model starts while the unit is reserved; when the reservation loses a
    race for the last unit, the real engine's sequence is cancelled and its slot freed."""
    import time

    from model_api.engine.base import GenerationRequest, SamplingParams
    from model_api.services import quota

    from ..fakes import intent_for

    app = make_app(model_backend="batching", model_n_parallel=1, model_max_queue=1)
    rt = app.extensions["model_api"]
    headers = make_user("alice", quota=1)
    assert app.test_client().post("/call_model", json={"prompt": "Hi", "max_tokens": 1},
                                  headers=headers).status_code == 201
    with database.session() as s:
        uid = s.scalar(select(User.id))
    req = GenerationRequest.single_prompt("Write a long story about a dragon.", SamplingParams(max_tokens=256))
    try:
        rt.calls.run(intent_for(uid, req, quota=quota.QuotaState(limit=1, remaining=1)))
    except quota.QuotaExceeded:
        pass
    else:
        raise AssertionError("the reservation should have refused the call")
    deadline = time.monotonic() + 10
    while rt.engine.stats()["active"] or rt.engine.stats()["waiting"]:
        assert time.monotonic() < deadline, rt.engine.stats()
        time.sleep(0.05)
    with database.session() as s:
        assert s.scalar(select(func.count(Call.id))) == 1 and s.scalar(select(User.used)) == 1
