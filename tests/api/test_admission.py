"""Admission control through the API: a full wait queue is 503 + Retry-After, refunded."""

import threading

from sqlalchemy import func, select

from model_api.models import Call, User


def test_full_queue_is_503_with_retry_after_and_refunds(make_app, make_user, database):
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
    assert used == codes.count(201) == charged  # every refused call gave its unit back
