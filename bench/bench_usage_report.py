"""The usage report (``GET /admin/usage``, ``model-api usage``) at 1 million call rows.

    .venv/bin/python bench/bench_usage_report.py [--db postgresql://postgres@127.0.0.1:5432/bench_usage]
                                                 [--rows 1000000] [--repeat 5] [--keep]

Creates the database if missing, migrates it, seeds users, keys and ``--rows``
calls spread over 90 days with one ``INSERT ... SELECT FROM generate_series``
(server-side: seconds, not a million round trips), ``ANALYZE``s, rolls the
closed days up (``services.usage.roll_up``, timed: the one-off backfill), then times
``services.usage.report`` for each ``group_by`` over the last 30 days, the last
day, and all time (best and median of ``--repeat`` runs, warm cache), and one
admin user listing page. Prints a Markdown table and each query's plan summary.
The seeded rows stay for the next run unless their count differs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from model_api.db import Database  # noqa: E402
from model_api.migrate import upgrade  # noqa: E402
from model_api.models import Call  # noqa: E402
from model_api.services import admin, usage  # noqa: E402
from model_api.services.ledger import QuotaPolicy  # noqa: E402

USERS, KEYS_PER_USER, MODELS = 1000, 2, ("smol", "smol-instruct", "remote-big")

# ids are known: users and keys are inserted into emptied tables (RESTART IDENTITY)
SEED = """
INSERT INTO calls (id, user_id, api_key_id, kind, status, prompt, params, model_id, charged, attempts,
                   cancel_requested, prompt_tokens, completion_tokens, created_at, started_at, finished_at)
SELECT gen_random_uuid(),
       1 + g % :users,
       CASE WHEN g % 3 = 0 THEN NULL ELSE (g % :users) * :keys + 1 + g % :keys END,
       'chat',
       CASE WHEN g % 50 = 0 THEN 'failed' WHEN g % 97 = 0 THEN 'cancelled' ELSE 'completed' END,
       'bench prompt', '{}',
       (ARRAY['smol', 'smol-instruct', 'remote-big'])[1 + g % 3],
       g % 50 <> 0,
       1, false,
       20 + g % 200, 1 + g % 128,
       t, t + interval '10 ms', t + interval '10 ms' + (g % 3000) * interval '1 ms'
FROM generate_series(1, :rows) AS g
CROSS JOIN LATERAL (SELECT now() - (g::float / :rows) * interval '90 days' AS t) AS ts
"""


def ensure_database(url: str) -> None:
    u = make_url(url)
    server = create_engine(u.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with server.connect() as conn:
        if not conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :d"), {"d": u.database}).scalar():
            conn.execute(text(f'CREATE DATABASE "{u.database}"'))
    server.dispose()


def seed(db: Database, rows: int) -> None:
    with db.session() as s:
        have = s.scalar(select(func.count()).select_from(Call))
    if have == rows:
        print(f"{rows} call rows already seeded")
        return
    t0 = time.perf_counter()
    with db.engine.begin() as conn:
        conn.execute(text("TRUNCATE calls, api_keys, admin_events, users, usage_daily, usage_days "
                          "RESTART IDENTITY CASCADE"))
        conn.execute(text("""INSERT INTO users (username, password_hash, used, is_active, is_admin, tokens_used, created_at)
                             SELECT 'customer' || g, 'x', 0, true, g = 1, 0, now() FROM generate_series(1, :n) g"""),
                     {"n": USERS})
        conn.execute(text("""INSERT INTO api_keys (user_id, prefix, key_hash, created_at, tokens_used)
                             SELECT u.id, 'mk-' || substr(md5(u.id || '-' || k), 1, 8), md5(u.id || '-' || k) || md5(k || '-' || u.id),
                                    now(), 0
                             FROM users u CROSS JOIN generate_series(1, :k) k ORDER BY u.id, k"""), {"k": KEYS_PER_USER})
        conn.execute(text(SEED), {"rows": rows, "users": USERS, "keys": KEYS_PER_USER})
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE calls"))
    print(f"seeded {rows} call rows in {time.perf_counter() - t0:.1f} s")


def timed(fn, repeat: int) -> tuple[float, float, object]:
    fn()  # warm the cache
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - t0) * 1000)
    return min(times), statistics.median(times), result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", default="postgresql://postgres@127.0.0.1:5432/bench_usage")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    url = "postgresql+psycopg://" + args.db.split("://", 1)[1]
    ensure_database(url)
    upgrade(url)
    db = Database(url, statement_timeout_ms=0)  # seeding a million rows outlasts the service's 10 s
    seed(db, args.rows)
    t0 = time.perf_counter()
    days = usage.roll_up(db, max_days=10_000)
    print(f"rolled up {days} closed days in {time.perf_counter() - t0:.1f} s (once; then one day a day)")
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE usage_daily, usage_days"))  # as autovacuum would soon after the backfill

    now = datetime.now(UTC)
    ranges = {"last 30 days": (now - timedelta(days=30), None), "last day": (now - timedelta(days=1), None),
              "all time (90 days)": (None, None)}
    print(f"\n| group_by | range | groups | calls counted | best ms | median ms |\n|---|---|---|---|---|---|")
    for group_by in usage.GROUPS:
        for label, (since, until) in ranges.items():
            def run(group_by=group_by, since=since, until=until):
                with db.session() as s:
                    return usage.report(s, group_by, since, until)
            best, median, rows = timed(run, args.repeat)
            print(f"| {group_by} | {label} | {len(rows)} | {sum(r.calls for r in rows)} | {best:.0f} | {median:.0f} |")

    def one_user(group_by="day"):
        with db.session() as s:
            uid = s.scalar(select(func.min(admin.User.id)))
            return usage.report(s, group_by, now - timedelta(days=30), None, uid)
    best, median, rows = timed(one_user, args.repeat)
    print(f"| day, one user (`/me/usage`) | last 30 days | {len(rows)} | {sum(r.calls for r in rows)} | {best:.0f} | {median:.0f} |")

    def users_page():
        with db.session() as s:
            return admin.list_users(s, QuotaPolicy(3, None), 50)
    best, median, _ = timed(users_page, args.repeat)
    print(f"| `GET /admin/users` page of 50 (calls, tokens, last call each) | all time | 50 | - | {best:.0f} | {median:.0f} |")
    db.dispose()


if __name__ == "__main__":
    main()
