"""Job-end webhooks through the app (the in-process executor and this process's
delivery loop), the real model, the real database and a real HTTP receiver;
the callback_url rules (SSRF). Failures, backoff and kill -9 against real
gunicorn and Celery processes: tests/jobs/test_webhooks.py."""

from __future__ import annotations

import secrets

import uuid

import pytest
from sqlalchemy import select

from model_api.models import Call, User, WebhookDelivery
from model_api.services import ledger
from model_api.services.webhooks import CallbackRefused, WebhookPolicy, Webhooks, check_url

from ..conftest import need, wait_for
from ..receiver import Receiver

HELLO = {"prompt": "Say hello.", "max_tokens": 2, "temperature": 0}
FAST = {"webhook_allow_private": True, "webhook_poll_seconds": 0.1}


class HoldingQueue:
    """Keeps jobs queued (nothing runs them), so a test decides how they end."""

    def enqueue(self, job_id: str) -> None:
        pass


def secret_from_cli(app, name: str = "alice") -> str:
    r = app.test_cli_runner().invoke(args=["users", "webhook-secret", name])
    assert r.exit_code == 0, r.output
    return r.output.strip()


def status(client, headers, job_id: str) -> dict:
    r = client.get(f"/async_call_status?job_id={job_id}", headers=headers)
    assert r.status_code == 200, r.json
    return r.json


def without_webhook(view: dict) -> dict:
    return {k: v for k, v in view.items() if k != "webhook"}


def test_a_completed_job_is_posted_once_signed_with_its_status_json(make_app, make_user):
    app = make_app(**FAST)
    client = app.test_client()
    headers = make_user("alice")
    with Receiver(secret=secret_from_cli(app)) as hook:
        r = client.post("/async_call_model", json={**HELLO, "callback_url": hook.url}, headers=headers)
        assert r.status_code == 200, r.json
        job = r.json["job_id"]
        assert status(client, headers, job)["webhook"]["state"] in ("waiting", "pending", "delivered")
        wait_for(lambda: hook.acknowledged(), timeout=120, what="the webhook")
        final = wait_for(lambda: (s := status(client, headers, job))["webhook"]["state"] == "delivered" and s,
                         timeout=10, what="delivered state")

    (d,) = hook.deliveries
    assert d.signed is True
    assert d.json == without_webhook(final) and d.json["state"] == "completed" and d.json["response"]
    assert uuid.UUID(d.headers["webhook-id"]) and d.headers["Content-Type"] == "application/json"
    assert final["webhook"] == {"state": "delivered", "attempts": 1, "last_status": 200}


def test_a_cancelled_job_and_a_failed_job_are_posted_too(make_app, make_user, database):
    app = make_app(**FAST)
    app.extensions["model_api"]._job_queue = HoldingQueue()
    client = app.test_client()
    headers = make_user("alice")
    with Receiver(secret=secret_from_cli(app)) as hook:
        submit = lambda: client.post("/async_call_model", json={**HELLO, "callback_url": hook.url},  # noqa: E731
                                     headers=headers).json["job_id"]
        cancelled, failed = submit(), submit()
        assert client.post("/async_call_cancel", json={"job_id": cancelled}, headers=headers).status_code == 200
        # how a job run ends when the model fails (Jobs._run_claimed): the same final write
        ledger.record_failure(database, uuid.UUID(failed), "model error: boom")
        wait_for(lambda: len(hook.acknowledged()) == 2, timeout=30, what="two webhooks")

    states = {d.json["job_id"]: d.json["state"] for d in hook.deliveries}
    assert states == {cancelled: "cancelled", failed: "failed"}
    assert all(d.signed for d in hook.deliveries)


def test_a_job_without_callback_url_has_no_webhook(client, make_user, database):
    headers = make_user("alice")
    job = client.post("/async_call_model", json=HELLO, headers=headers).json["job_id"]
    assert "webhook" not in status(client, headers, job)
    with database.session() as s:
        assert s.scalars(select(WebhookDelivery)).all() == []


def test_the_webhook_secret_command_keeps_the_secret_until_rotated(app, make_user):
    make_user("alice")
    first = secret_from_cli(app)
    assert first.startswith("whsec_") and secret_from_cli(app) == first
    r = app.test_cli_runner().invoke(args=["users", "webhook-secret", "alice", "--rotate"])
    assert r.exit_code == 0 and r.output.strip() not in ("", first)
    assert app.test_cli_runner().invoke(args=["users", "webhook-secret", "nobody"]).exit_code != 0


# --- callback_url rules ------------------------------------------------------------------

REFUSED_IN_PRODUCTION = [
    "http://127.0.0.1:9/hook",  # the example: loopback (and http)
    "https://127.0.0.1/hook",
    "https://localhost/hook",  # a name: its resolved address is what counts
    "https://10.1.2.3/hook",
    "https://192.168.0.10/hook",
    "https://169.254.169.254/latest/meta-data",  # cloud metadata (link-local)
    "https://100.64.0.1/hook",  # carrier-grade NAT
    "https://0.0.0.0/hook",
    "https://[::1]/hook",
    "https://[::ffff:127.0.0.1]/hook",  # IPv4-mapped loopback
    "https://[fe80::1]/hook",
    "http://93.184.216.34/hook",  # public, but http in production
    "ftp://93.184.216.34/hook",
    "https://user:pw@93.184.216.34/hook",
    "https:///hook",
    "not a url",
]


@pytest.mark.parametrize("url", REFUSED_IN_PRODUCTION)
def test_a_callback_url_refused_in_production_is_400_before_anything_is_charged(make_app, make_user, database,
                                                                                  is_postgres, url):
    need(is_postgres, "ENV=production needs a server database (set DATABASE_URL to PostgreSQL)")
    client = make_app(env="production", secret_key=secrets.token_hex(32)).test_client()
    headers = make_user("alice")
    r = client.post("/async_call_model", json={**HELLO, "callback_url": url}, headers=headers)
    assert r.status_code == 400, r.json
    assert r.json["error"]["code"] == "invalid_callback_url" and "callback_url" in r.json["error"]["details"]
    with database.session() as s:
        assert s.scalars(select(Call)).all() == [] and s.scalar(select(User.used)) == 0


def test_development_allows_http_but_still_refuses_private_addresses(make_app, make_user):
    headers = make_user("alice")
    dev = make_app(env="development").test_client()
    r = dev.post("/async_call_model", json={**HELLO, "callback_url": "http://127.0.0.1:9/hook"}, headers=headers)
    assert r.status_code == 400 and "non-public" in r.json["error"]["message"]
    allowed = make_app(env="development", webhook_allow_private=True).test_client()
    r = allowed.post("/async_call_model", json={**HELLO, "callback_url": "http://127.0.0.1:9/hook"}, headers=headers)
    assert r.status_code == 200, r.json


@pytest.mark.parametrize("url,addresses", [("https://93.184.216.34/hook", ["93.184.216.34"]),
                                           ("https://[2606:4700:4700::1111]:8443/x", ["2606:4700:4700::1111"])])
def test_a_public_address_is_accepted_and_is_what_delivery_connects_to(url, addresses):
    assert check_url(url, production=True, allow_private=False) == addresses


def test_delivery_checks_the_address_again_and_gives_up_on_a_private_one(app, make_user, database):
    """A URL accepted when private addresses were allowed (or a name that resolved
    elsewhere at submit) is checked again at each delivery."""
    headers = make_user("alice")
    rt = app.extensions["model_api"]
    rt._job_queue = HoldingQueue()
    rt.webhooks.stop()  # this test delivers by hand
    client = app.test_client()
    rt.webhooks.policy = WebhookPolicy(1, (0.0,), 1.0, allow_private=True, production=False)
    job = client.post("/async_call_model", json={**HELLO, "callback_url": "http://127.0.0.1:9/hook"},
                      headers=headers).json["job_id"]
    ledger.record_failure(database, uuid.UUID(job), "model error: boom")
    strict = Webhooks(database, WebhookPolicy(3, (0.0,), 1.0, allow_private=False, production=False))
    assert strict.deliver_due() == 1
    hook = status(client, headers, job)["webhook"]
    assert hook["state"] == "failed" and hook["attempts"] == 1 and "refused" in hook["last_error"]


def test_check_url_names_the_problem():
    with pytest.raises(CallbackRefused, match="https"):
        check_url("http://93.184.216.34/", production=True, allow_private=False)
    with pytest.raises(CallbackRefused, match="does not resolve"):
        check_url("https://no-such-host.invalid/", production=True, allow_private=False)
