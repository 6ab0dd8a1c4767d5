"""The console in real Chromium (Debian's, driven by Playwright) against a real
gunicorn server and the real model: an admin creates a customer and a key; the
customer chats in the playground, sees tokens arrive before the reply ends, sees
the quota fall by one and is refused clearly when it runs out; a request without
the CSRF token is refused; a customer cannot open admin pages. The README's
screenshot (docs/console.png) is taken here."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import requests
from sqlalchemy import update

from model_api.models import User

from ..conftest import DEFAULT_PASSWORD, need

pytestmark = [pytest.mark.model, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = (os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("google-chrome")
            or "/usr/bin/chromium")
SCREENSHOT = ROOT / "docs" / "console.png"


@pytest.fixture
def browser():
    need(Path(CHROMIUM).exists(), f"Chromium not found at {CHROMIUM} (`apt-get install chromium`; .ci/run does)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        need(False, "playwright is not installed (requirements-dev.txt)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield b
        b.close()


def sign_in(page, base: str, username: str, password: str) -> None:
    page.goto(base + "/console/login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_selector("header .who")


# records every change of the reply bubble's text together with its streaming state
WATCH_REPLY = """() => {
  window.__renders = [];
  new MutationObserver(() => {
    const reply = [...document.querySelectorAll('.msg.assistant')].pop();
    if (reply) window.__renders.push({len: reply.textContent.length, state: reply.dataset.state});
  }).observe(document.getElementById('conversation'), {subtree: true, childList: true, characterData: true,
                                                       attributes: true});
}"""


def chat(page, text: str) -> None:
    page.evaluate(WATCH_REPLY)
    page.fill("#prompt", text)
    page.click("#send")
    page.wait_for_function("() => document.querySelector('#send') && !document.querySelector('#send').disabled "
                           "&& (!document.querySelector('.msg.assistant') || "
                           "[...document.querySelectorAll('.msg.assistant')].pop().dataset.state === 'done' "
                           "|| !document.querySelector('#chat-error').hidden)", timeout=120_000)


def test_admin_and_customer_journeys_in_chromium(browser, live_server, make_user, database):
    make_user("root", quota=100)
    with database.session() as s:
        s.execute(update(User).where(User.username == "root").values(is_admin=True))
    with live_server(SECRET_KEY="x" * 40, MODEL_N_PARALLEL="2") as srv:
        # the admin creates a customer with a quota of 2, then a key for them
        admin_ctx = browser.new_context()
        admin = admin_ctx.new_page()
        sign_in(admin, srv.url, "root", DEFAULT_PASSWORD)
        admin.goto(srv.url + "/console/admin/users")
        admin.fill("#new-user input[name=username]", "carol")
        admin.fill("#new-user input[name=password]", "carol's long password")
        admin.fill("#new-user input[name=quota]", "2")
        admin.click("#new-user button[type=submit]")
        assert admin.locator('tr[data-user="carol"] td.left').inner_text() == "2"
        admin.goto(srv.url + "/console/admin/keys")
        admin.select_option("#admin-new-key select[name=user]", "carol")
        admin.fill("#admin-new-key input[name=name]", "carol's app")
        admin.click("#admin-new-key button[type=submit]")
        key = admin.locator("#new-key").inner_text()
        me = requests.get(srv.url + "/me", headers={"Authorization": f"Bearer {key}"}, timeout=10)
        assert me.status_code == 200 and me.json()["username"] == "carol"

        # the customer chats: tokens arrive before the reply ends, the quota falls by one
        page = browser.new_context(viewport={"width": 1100, "height": 760}).new_page()
        sign_in(page, srv.url, "carol", "carol's long password")
        assert page.inner_text("#quota-remaining") == "2"
        page.fill("#max-tokens", "24")
        chat(page, "Write three short sentences about the sea.")
        renders = page.evaluate("window.__renders")
        reply = page.locator(".msg.assistant").last.inner_text()
        assert reply.strip()
        streaming = [r["len"] for r in renders if r["state"] == "streaming" and r["len"] > 0]
        assert streaming and min(streaming) < len(reply), renders  # shown in part while still streaming
        assert len(set(streaming)) >= 2, renders  # and grew piece by piece
        assert page.inner_text("#quota-remaining") == "1"
        page.screenshot(path=str(SCREENSHOT), full_page=True)

        page.fill("#max-tokens", "4")
        chat(page, "And one more about the sky.")
        assert page.inner_text("#quota-remaining") == "0"
        chat(page, "One too many?")
        error = page.inner_text("#chat-error")
        assert "quota exhausted" in error, error
        page.reload()
        assert page.inner_text("#quota-remaining") == "0"

        # a state change without the CSRF token is refused (the session alone is not enough)
        status = page.evaluate("""async () => (await fetch('/console/keys', {method: 'POST',
            headers: {'Content-Type': 'application/x-www-form-urlencoded'}, body: 'name=sneaky'})).status""")
        assert status == 403
        page.goto(srv.url + "/console/keys")
        assert "sneaky" not in page.content()

        # a customer cannot open admin pages
        r = page.goto(srv.url + "/console/admin/users")
        assert r.status == 403 and "for administrators" in page.inner_text("#error-message")
        assert "root" not in page.content()

        # the admin sees what happened: the audit log and the calls in the usage report
        admin.goto(srv.url + "/console/admin/events")
        events = admin.inner_text("#events")
        assert "user.create" in events and "key.create" in events
        admin.goto(srv.url + "/console/usage?scope=all&group_by=user")
        assert "carol" in admin.inner_text("#usage")
        admin_ctx.close()
