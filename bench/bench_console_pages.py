"""Server-side render time of each console page, over the database that
``bench_usage_report.py`` seeded (1M calls, 1,000 users; run that first).

    .venv/bin/python bench/bench_console_pages.py [--db postgresql://postgres@127.0.0.1:5432/bench_usage]

Signs in as ``customer1`` (the seeded admin; its password is set here) through
Flask's test client (no network, no browser: the time is the app's, database
included) and prints the best and median of 10 renders of every page.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sqlalchemy import update  # noqa: E402

from model_api import create_app  # noqa: E402
from model_api.models import User  # noqa: E402
from model_api.services.auth import hash_password  # noqa: E402

PASSWORD = "bench password 123"
PAGES = ["/console/", "/console/history", "/console/keys", "/console/usage",
         "/console/usage?group_by=model", "/console/usage?scope=all&group_by=day",
         "/console/usage?scope=all&group_by=user", "/console/usage?scope=all&group_by=model",
         "/console/admin/users", "/console/admin/keys", "/console/admin/events"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", default="postgresql://postgres@127.0.0.1:5432/bench_usage")
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    app = create_app({"database_url": args.db, "model_load_at_start": False, "recover_jobs_at_start": False,
                      "deliver_webhooks": False, "log_level": "WARNING", "env": "test"})
    rt = app.extensions["model_api"]
    with rt.db.session() as s:
        s.execute(update(User).where(User.username == "customer1").values(password_hash=hash_password(PASSWORD),
                                                                          is_admin=True))
    client = app.test_client()
    token = re.search(r'name="csrf-token" content="([^"]+)"', client.get("/console/login").get_data(as_text=True))
    r = client.post("/console/login", data={"username": "customer1", "password": PASSWORD, "csrf_token": token.group(1)})
    assert r.status_code == 302, r.status_code
    print("| page | best ms | median ms |\n|---|---|---|")
    for page in PAGES:
        assert client.get(page).status_code == 200, page
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            client.get(page)
            times.append((time.perf_counter() - t0) * 1000)
        print(f"| `{page}` | {min(times):.0f} | {statistics.median(times):.0f} |")
    rt.close()


if __name__ == "__main__":
    main()
