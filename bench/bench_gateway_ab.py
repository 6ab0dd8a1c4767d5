"""Gateway cost of two checkouts, side by side: what a model call costs in our
own code (auth, quota reservation, call row, result write, JSON) with an engine
that answers instantly, so only the gateway is measured.

    .venv/bin/python bench/bench_gateway_ab.py --base ../old-checkout --new . [--db URL] [--rounds 30] [--auth key]

Each checkout runs in its own process (its own copy of the package) with the
real Flask app and a real database; the two take turns, a batch of calls each,
for ``--rounds`` rounds, so both see the same machine load. Prints p50/p99 per
side and new/base ratios. The database is PostgreSQL when ``--db`` names one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

WORKER = textwrap.dedent('''
    import base64, json, sys, threading, time
    from sqlalchemy import create_engine, text
    from model_api.app import create_app
    from model_api.db import Base
    from model_api.engine import base as eb
    from model_api.services import auth

    class Instant(eb.Generation):
        def __init__(self):
            self.done = False
            self.result = None
        def __next__(self):
            if self.done:
                self.result = eb.Completion("ok", 3, 1, "stop", "instant")
                raise StopIteration
            self.done = True
            return "ok"

    class InstantEngine(eb.Engine):
        model_name, context_size = "instant", 4096
        # both engine contracts: prepare()/stream(prepared) and count/check()/stream(request)
        def prepare(self, request):
            return eb.PreparedPrompt(request, 3)
        def count_prompt_tokens(self, request):
            return 3
        def stream(self, prompt, cancel=None):
            return Instant()

    db_url, user = sys.argv[1], sys.argv[2]
    app = create_app({"database_url": db_url, "model_load_at_start": False, "recover_jobs_at_start": False,
                      "env": "test", "default_quota": 10**9})
    rt = app.extensions["model_api"]
    if hasattr(rt, "engines"):
        rt.engines.install(None, InstantEngine())
    else:
        rt._engine = InstantEngine()
    with rt.db.session() as s:
        try:
            auth.create_user(s, user, "bench password 123", 10**9)
        except Exception:
            pass
    client = app.test_client()
    headers = {"Authorization": "Basic " + base64.b64encode(f"{user}:bench password 123".encode()).decode()}
    if sys.argv[3] == "key":  # an API key (its own lookup each call; Basic's is cached)
        from sqlalchemy import select
        from model_api.models import User
        from model_api.services import api_keys
        with rt.db.session() as s:
            key = api_keys.create_key(s, s.scalars(select(User).where(User.username == user)).one()).key
        headers = {"Authorization": f"Bearer {key}"}
    body = {"prompt": "Hi", "max_tokens": 1}
    for _ in range(20):
        client.post("/call_model", json=body, headers=headers)
    print("ready", flush=True)
    for line in sys.stdin:
        n = int(line)
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            r = client.post("/call_model", json=body, headers=headers)
            out.append((time.perf_counter() - t0) * 1000)
            assert r.status_code == 201, r.get_data(as_text=True)
        print(json.dumps(out), flush=True)
''')


def start(checkout: Path, db: str, user: str, auth: str = "basic") -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(checkout.resolve() / "src"), "LOG_LEVEL": "WARNING"}
    p = subprocess.Popen([sys.executable, "-c", WORKER, db, user, auth], env=env, cwd=checkout, text=True,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    line = p.stdout.readline().strip()
    if line != "ready":
        raise RuntimeError(f"{checkout}: worker did not start ({line!r})")
    return p


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--new", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--db", required=True, help="a migrated database both checkouts can use (the newer schema)")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--auth", choices=("basic", "key"), default="basic",
                    help="sign in with HTTP Basic (its check is cached) or an API key (looked up each call)")
    args = ap.parse_args()
    sides = {"base": start(args.base, args.db, "bench-base", args.auth),
             "new": start(args.new, args.db, "bench-new", args.auth)}
    lat: dict[str, list[float]] = {k: [] for k in sides}
    try:
        for i in range(args.rounds):
            for name in (("base", "new") if i % 2 == 0 else ("new", "base")):
                p = sides[name]
                p.stdin.write(f"{args.batch}\n")
                p.stdin.flush()
                lat[name] += json.loads(p.stdout.readline())
    finally:
        for p in sides.values():
            p.stdin.close()
            p.wait(30)
    for name, v in lat.items():
        print(f"{name}: {len(v)} calls, p50 {pct(v, 50):.2f} ms, p99 {pct(v, 99):.2f} ms, "
              f"mean {statistics.mean(v):.2f} ms")
    print(f"new/base: p50 {pct(lat['new'], 50) / pct(lat['base'], 50):.2f}x, "
          f"p99 {pct(lat['new'], 99) / pct(lat['base'], 99):.2f}x")


if __name__ == "__main__":
    main()
