"""Job-end webhooks end to end: a real gunicorn server, real Celery worker
processes over real Redis (or the server's in-process executor), the real
model, and a real HTTP receiver that checks every signature and fails the
first attempts (a 500, a hang past the sender's timeout, a closed port)."""

from __future__ import annotations

import time
import uuid

import pytest
from sqlalchemy import select

from model_api.models import Call, CallStatus, User, WebhookDelivery
from model_api.services.webhooks import WebhookPolicy, Webhooks

from ..conftest import wait_for
from ..receiver import Receiver
from .test_async_jobs import stack  # noqa: F401 - the fixture

pytestmark = [pytest.mark.model, pytest.mark.slow, pytest.mark.timeout(900)]

#: the waits before attempts 1, 2, 3, 4 (seconds): short, so the schedule is seen in a test
BACKOFF = (0.0, 0.5, 1.0, 3.0)
TIMEOUT = 0.5


def settings(**more: object) -> dict[str, object]:
    return {"webhook_allow_private": 1, "webhook_poll_seconds": 0.1, "webhook_timeout_seconds": TIMEOUT,
            "webhook_backoff_seconds": ",".join(map(str, BACKOFF)), **more}


def secret_of(database, name: str = "alice") -> str:
    """The user's signing secret, as ``model-api users webhook-secret`` prints it."""
    with database.session() as s:
        user_id = s.scalar(select(User.id).where(User.username == name))
    return Webhooks(database, WebhookPolicy(1, (0.0,), 1.0, False, False)).secret_of(user_id)


def outbox(database, job_id: str) -> WebhookDelivery:
    with database.session() as s:
        return s.scalars(select(WebhookDelivery).where(WebhookDelivery.call_id == uuid.UUID(job_id))).one()


@pytest.mark.parametrize("kind", ["inprocess", "celery"])
def test_after_a_500_a_timeout_and_a_refused_connection_the_job_end_is_delivered_once_on_the_backoff_schedule(
        stack, make_user, database, kind):  # noqa: F811
    st = stack(kind, workers=1, **settings())
    headers = make_user("alice", quota=1)
    with Receiver(script=["500", "hang+down"], secret=secret_of(database), hang_seconds=2 * TIMEOUT + 1,
                  down_seconds=3.0) as hook:
        job = st.submit(headers, "Say hello.", max_tokens=4, temperature=0, callback_url=hook.url)
        wait_for(lambda: st.status(headers, job).get("webhook", {}).get("state") == "delivered", timeout=300,
                 what="the webhook delivered")
        time.sleep(1.0)  # nothing more arrives
        final = st.status(headers, job)

    first, hung, ok = hook.deliveries  # the refused attempt never reached it
    assert [d.answered for d in hook.deliveries] == ["500", "hang", "200"]
    assert len(hook.acknowledged()) == 1
    assert all(d.signed for d in hook.deliveries)  # every attempt signed with the user's secret
    assert len({d.headers["webhook-id"] for d in hook.deliveries}) == 1  # one delivery, retried
    assert ok.json == {k: v for k, v in final.items() if k != "webhook"} and ok.json["state"] == "completed"
    assert final["webhook"] == {"state": "delivered", "attempts": 4, "last_status": 200}
    # the schedule: attempt 2 waited BACKOFF[1] after the 500; attempt 4 came after the hang timed out,
    # BACKOFF[2] until the refused attempt 3, and BACKOFF[3] after it, once the port was open again
    assert hung.at - first.at >= BACKOFF[1]
    assert ok.at - hung.at >= TIMEOUT + BACKOFF[2] + BACKOFF[3] - 0.05
    ((down_from, down_to),) = hook.refused_windows  # attempt 3 fell in here: 4 attempts, 3 received
    assert hung.at <= down_from < down_to < ok.at
    # and the delivering process says how each attempt failed
    log = (st.workers[0] if kind == "celery" else st.server).log()
    assert all(why in log for why in ('"error": "HTTP 500"', '"error": "timed out after 0.5s"', "ConnectError"))


def test_a_delivery_survives_kill_9_of_the_worker_between_the_job_end_and_its_delivery(
        stack, make_user, database):  # noqa: F811
    # the first attempt waits 5 s after the job ends: the worker is killed in that gap
    st = stack("celery", workers=1, **settings(webhook_backoff_seconds="5,0.5"))
    headers = make_user("alice", quota=1)
    with Receiver(secret=secret_of(database)) as hook:
        job = st.submit(headers, "Say hello.", max_tokens=4, temperature=0, callback_url=hook.url)

        def ended() -> bool:
            with database.session() as s:
                return s.get(Call, uuid.UUID(job)).status == CallStatus.COMPLETED.value

        wait_for(ended, timeout=300, interval=0.05, what="the job's end")
        st.workers[0].kill9()
        row = outbox(database, job)
        assert row.state == "pending" and row.attempts == 0  # armed with the job's end, not yet tried
        assert hook.deliveries == []

        st.add_worker()  # a new worker finds it in the outbox
        wait_for(lambda: hook.acknowledged(), timeout=120, what="the delivery after the restart")
        time.sleep(1.0)

    (d,) = hook.deliveries
    assert d.signed and d.json["job_id"] == job and d.json["state"] == "completed"
    assert st.status(headers, job)["webhook"] == {"state": "delivered", "attempts": 1, "last_status": 200}


def test_a_receiver_that_never_answers_2xx_is_given_up_after_max_attempts(stack, make_user, database):  # noqa: F811
    st = stack("inprocess", **settings(webhook_max_attempts=3, webhook_backoff_seconds="0,0.2"))
    headers = make_user("alice", quota=1)
    with Receiver(script=["500"] * 10, secret=secret_of(database)) as hook:
        job = st.submit(headers, "Say hello.", max_tokens=4, temperature=0, callback_url=hook.url)
        wait_for(lambda: st.status(headers, job).get("webhook", {}).get("state") == "failed", timeout=300,
                 what="the webhook given up")
        time.sleep(1.0)
    assert len(hook.deliveries) == 3 and hook.acknowledged() == []
    hook_state = st.status(headers, job)["webhook"]
    assert hook_state == {"state": "failed", "attempts": 3, "last_status": 500, "last_error": "HTTP 500"}
