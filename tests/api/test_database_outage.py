"""A database that goes away and comes back strands nothing, with no restart:
a real gunicorn server talks to PostgreSQL through a TCP proxy that the test
switches off for ten seconds while sync calls, streams and 50 jobs are in flight."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import pytest
import requests
from sqlalchemy import func, select

from model_api.models import Call, User

from ..conftest import DEFAULT_PASSWORD, need, wait_for
from ..faults.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.postgres, pytest.mark.model, pytest.mark.slow]

AUTH = ("alice", DEFAULT_PASSWORD)
FINAL = ("completed", "failed", "cancelled")


@pytest.fixture
def pg_proxy(db_url, is_postgres):
    need(is_postgres, "needs PostgreSQL: the outage is a proxy in front of it")
    u = urlparse(db_url)
    proxy = TcpProxy(u.hostname or "127.0.0.1", u.port or 5432).start()
    yield proxy, db_url.replace(u.netloc, f"{u.username}@127.0.0.1:{proxy.port}" if u.username
                                else f"127.0.0.1:{proxy.port}")
    proxy.close()


def _post(url: str, path: str, body: dict) -> int:
    # generous: on a busy 2-core machine 50 queued jobs slow every generation down
    return requests.post(url + path, json=body, auth=AUTH, timeout=600).status_code


def _stream(url: str) -> tuple[int, bool]:
    with requests.post(url + "/v1/chat/completions", auth=AUTH, stream=True, timeout=600, json={
            "messages": [{"role": "user", "content": "Write a story about a lighthouse."}],
            "max_tokens": 24, "stream": True}) as r:
        done = r.status_code == 200 and any(line == b"data: [DONE]" for line in r.iter_lines())
        return r.status_code, done


def test_a_ten_second_outage_leaves_every_row_final_and_every_unit_accounted(
        pg_proxy, live_server, make_user, database):
    proxy, proxied_url = pg_proxy
    make_user("alice", quota=1000)
    with live_server(threads=16, DATABASE_URL=proxied_url, RECOVER_JOBS_AT_START="true",
                     RECONCILE_INTERVAL_SECONDS="2", JOB_WORKERS="4") as srv:
        assert _post(srv.url, "/call_model", {"prompt": "Hi", "max_tokens": 1}) == 201  # warm up
        jobs = [_post(srv.url, "/async_call_model", {"prompt": f"Count to {i}", "max_tokens": 4}) for i in range(50)]
        assert jobs == [200] * 50
        with ThreadPoolExecutor(8) as pool:
            syncs = [pool.submit(_post, srv.url, "/call_model", {"prompt": "Write a long story.", "max_tokens": 24})
                     for _ in range(3)]
            streams = [pool.submit(_stream, srv.url) for _ in range(2)]
            time.sleep(1.0)  # they are generating
            proxy.refuse()
            t0 = time.monotonic()
            during = [_post(srv.url, "/call_model", {"prompt": "Hi", "max_tokens": 1}) for _ in range(3)]
            answered_in = time.monotonic() - t0
            time.sleep(max(0.0, 10 - answered_in))
            proxy.restore()
            sync_codes = [f.result() for f in syncs]
            stream_results = [f.result() for f in streams]

        # refused while it was down, quickly and with a 503, never a 500
        assert during == [503] * 3 and answered_in < 10
        # calls admitted before the outage got their reply; their rows wait for the database
        assert set(sync_codes) <= {201, 503} and 500 not in sync_codes, sync_codes
        assert all(code in (200, 503) for code, _ in stream_results), stream_results

        def settled():
            with database.session() as s:
                open_rows = s.scalar(select(func.count(Call.id)).where(Call.status.not_in(FINAL)))
            return open_rows == 0

        recovered_at = time.monotonic()
        # "within one reconcile interval of recovery" (2 s) plus the jobs' own run time
        wait_for(settled, timeout=180, interval=0.5, what="every call row to reach a final state")
        with database.session() as s:
            used = s.scalar(select(User.used))
            charged = s.scalar(select(func.count(Call.id)).where(Call.charged.is_(True)))
            completed = s.scalar(select(func.count(Call.id)).where(Call.status == "completed"))
        assert used == charged
        assert completed >= 50  # every job ran once the database was back
    print(f"settled {time.monotonic() - recovered_at:.1f} s after the database came back")


def _timed(method, url: str, **kw) -> tuple[int, float]:
    t0 = time.monotonic()
    r = method(url, timeout=60, **kw)
    return r.status_code, time.monotonic() - t0


def test_a_database_that_stops_answering_gets_quick_503s_while_health_stays_live(pg_proxy, live_server, make_user):
    """The proxy keeps every connection open and forwards nothing, like a network
    path that swallows traffic: open pooled connections would wait for ever."""
    proxy, proxied_url = pg_proxy
    make_user("alice", quota=100)
    with live_server(threads=16, DATABASE_URL=proxied_url, DATABASE_STATEMENT_TIMEOUT_MS="2000",
                     DATABASE_CONNECT_TIMEOUT_SECONDS="2", DATABASE_POOL_TIMEOUT_SECONDS="2") as srv:
        body = {"prompt": "Hi", "max_tokens": 1}
        with ThreadPoolExecutor(8) as pool:  # pooled connections exist, then the database goes silent
            assert list(pool.map(lambda _: _post(srv.url, "/call_model", body), range(8))) == [201] * 8
            proxy.freeze()
            calls = [pool.submit(_timed, requests.post, srv.url + "/call_model", json=body, auth=AUTH)
                     for _ in range(8)]
            time.sleep(0.5)
            health = [_timed(requests.get, srv.url + "/health_check") for _ in range(5)]
            ready = _timed(requests.get, srv.url + "/ready")
            answered = [f.result() for f in calls]
        proxy.refuse()
        proxy.restore()
        after = _post(srv.url, "/call_model", body)

    assert all(code == 204 and seconds < 1.0 for code, seconds in health), health
    assert ready[0] == 503 and ready[1] < 15, ready
    # statement limit 2 s + the watchdog's 2 s grace, or connect timeout 2 s, or pool timeout 2 s
    assert all(code == 503 and seconds < 15 for code, seconds in answered), answered
    assert after == 201  # the pool heals by itself once the database answers again
