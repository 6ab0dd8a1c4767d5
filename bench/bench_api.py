"""Benchmarks of the API against raw llama-cpp-python, run side by side in one go.

    .venv/bin/python bench/bench_api.py [--backend llama|batching] [--quick]

1. single stream: raw ``Llama.create_chat_completion`` vs ``POST /call_model``
   over HTTP, same prompt, temperature 0, 256 tokens (target API >= 0.95x raw)
2. concurrency 1, 2, 4, 8, 16 through the API: aggregate tokens/s and
   per-request latency (target at 8 users >= 1.8x raw single stream)
3. gateway overhead: 1-token calls through auth + quota + DB write vs the
   engine alone (target p50 <= 3 ms, p99 <= 15 ms added)
4. async: 500 jobs submitted at once all complete; jobs/s and tokens/s vs sync

Prints ratios, writes bench/out/results.json and bench/out/concurrency.png.
Run it on a quiet machine: it measures the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

PROMPT = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle."
USER, PASSWORD = "bench", "bench password 123"
OUT = ROOT / "bench" / "out"


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = max(0, min(len(values) - 1, round(q / 100 * (len(values) - 1))))
    return values[k]


def machine_info() -> dict:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import llama_cpp

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "llama_cpp_python": llama_cpp.__version__}


def in_own_process(fn, *args):
    """Run ``fn`` in a fresh process: once a llama_cpp.Llama has run in a process,
    another llama.cpp context there decodes at about half speed (measured), so
    each side gets a process of its own, as the API server has."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


# ---------------------------------------------------------------- raw baseline
def raw_single_stream(max_tokens: int) -> dict:
    from llama_cpp import Llama

    from model_api.engine.local import default_model_path, load_backends

    load_backends()
    llm = Llama(default_model_path(), n_ctx=2048, n_threads=os.cpu_count(), verbose=False)
    llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)  # warm-up
    runs = []
    for _ in range(2):
        llm.reset()
        t0 = time.perf_counter()
        out = llm.create_chat_completion([{"role": "user", "content": PROMPT}], max_tokens=max_tokens, temperature=0)
        dt = time.perf_counter() - t0
        runs.append((out["usage"]["completion_tokens"], dt))
    del llm
    tokens, dt = min(runs, key=lambda r: r[1])
    return {"completion_tokens": tokens, "seconds": dt, "tok_s": tokens / dt}


def engine_alone_latencies(backend: str, n: int) -> list[float]:
    from model_api.engine.base import GenerationRequest, SamplingParams
    from model_api.runtime import load_engine
    from model_api.settings import Settings

    engine = load_engine(Settings(model_backend=backend))
    req = GenerationRequest.single_prompt("Hi", SamplingParams(max_tokens=1, temperature=0))
    engine.generate(req)
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        engine.generate(req)
        lat.append(time.perf_counter() - t0)
    engine.close()
    return lat


# ---------------------------------------------------------------- the API
class Server:
    def __init__(self, backend: str, db_url: str, threads: int = 32):
        from tests.conftest import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT / "src"),
            "DATABASE_URL": db_url,
            "MODEL_BACKEND": backend,
            "MAX_TOKENS_CAP": "1024",
            "JOB_WORKERS": os.environ.get("BENCH_JOB_WORKERS", "8"),
            "BIND": f"127.0.0.1:{self.port}",
            "WEB_WORKERS": "1",
            "WEB_THREADS": str(threads),
            "LOG_LEVEL": "INFO",  # the access log gives the server-side split used in part 3
        }

    def __enter__(self):
        model_api = [sys.executable, "-m", "model_api.entry"]
        subprocess.run(model_api + ["db", "upgrade"], env=self.env, check=True, capture_output=True)
        subprocess.run(model_api + ["users", "create", USER, "--password-stdin", "--quota", "1000000"],
                       input=PASSWORD + "\n", env=self.env, text=True, capture_output=True)
        subprocess.run(model_api + ["users", "set-quota", USER, "1000000", "--reset-usage"], env=self.env,
                       check=True, capture_output=True)
        self.log = open(OUT / "server.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "python:model_api.gunicorn_conf", "model_api.wsgi:app"],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
        )
        for _ in range(600):
            try:
                if requests.get(self.url + "/ready", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not become ready; see bench/out/server.log")

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(60)


def api_call(session: requests.Session, url: str, max_tokens: int, prompt: str = PROMPT) -> tuple[float, int]:
    t0 = time.perf_counter()
    r = session.post(url + "/call_model", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
                     auth=(USER, PASSWORD), timeout=600)
    dt = time.perf_counter() - t0
    r.raise_for_status()
    return dt, r.json()["usage"]["completion_tokens"]


def api_single_stream(url: str, max_tokens: int) -> dict:
    s = requests.Session()
    api_call(s, url, 4, "hi")
    runs = [api_call(s, url, max_tokens) for _ in range(2)]
    dt, tokens = min(runs)
    return {"completion_tokens": tokens, "seconds": dt, "tok_s": tokens / dt}


def api_concurrency(url: str, users: int, per_user: int, max_tokens: int) -> dict:
    def user_loop(i: int) -> list[tuple[float, int]]:
        s = requests.Session()
        return [api_call(s, url, max_tokens, f"{PROMPT} (variant {i}-{j})") for j in range(per_user)]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(users) as pool:
        results = [r for batch in pool.map(user_loop, range(users)) for r in batch]
    wall = time.perf_counter() - t0
    lat = [r[0] for r in results]
    tokens = sum(r[1] for r in results)
    return {"users": users, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "agg_tok_s": tokens / wall, "p50_s": pct(lat, 50), "p99_s": pct(lat, 99)}


def api_overhead_latencies(url: str, n: int) -> list[float]:
    s = requests.Session()
    s.headers["X-Request-ID"] = "overhead-warmup"
    api_call(s, url, 1, "Hi")
    out = []
    for i in range(n):
        s.headers["X-Request-ID"] = f"overhead-{i}"
        out.append(api_call(s, url, 1, "Hi")[0])
    return out


def server_side_overhead_ms(log_path: Path) -> list[float]:
    """Per request: the server's own latency minus the model's time, from the JSON
    access log (auth, quota reservation, two DB commits, JSON, Flask): the gateway's
    cost without the noise of the generation itself."""
    out = []
    for line in log_path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if str(rec.get("request_id", "")).startswith("overhead-") and rec.get("request_id") != "overhead-warmup" \
                and "model_seconds" in rec:
            out.append(rec["latency_ms"] - rec["model_seconds"] * 1000)
    return out


def api_async(url: str, jobs: int, max_tokens: int) -> dict:
    auth = (USER, PASSWORD)

    def submit(i: int) -> str:
        r = requests.post(url + "/async_call_model", json={"prompt": f"Say something about number {i}.",
                                                           "max_tokens": max_tokens, "temperature": 0},
                          auth=auth, timeout=60)
        r.raise_for_status()
        return r.json()["job_id"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        ids = list(pool.map(submit, range(jobs)))
    submitted = time.perf_counter() - t0
    pending, tokens, states = set(ids), 0, {}
    s = requests.Session()
    while pending:
        for job in list(pending):
            st = s.get(url + "/async_call_status", params={"job_id": job}, auth=auth, timeout=60).json()
            if st["job_status"] != "processing":
                pending.discard(job)
                states[st["state"]] = states.get(st["state"], 0) + 1
                tokens += (st.get("usage") or {}).get("completion_tokens", 0)
        if pending:
            time.sleep(0.5)
    wall = time.perf_counter() - t0
    return {"jobs": jobs, "states": states, "lost": jobs - sum(states.values()), "submit_s": submitted,
            "wall_s": wall, "jobs_s": jobs / wall, "tok_s": tokens / wall}


def api_overhead_and_exit(srv: Server, engine_lat: list[float], n: int) -> None:
    api_lat = api_overhead_latencies(srv.url, n)
    srv.log.flush()
    gw = server_side_overhead_ms(OUT / "server.log")
    print(f"3. engine alone p50 {pct(engine_lat, 50)*1000:.1f} ms; API p50 {pct(api_lat, 50)*1000:.1f} ms; "
          f"server-side gateway time ({len(gw)} calls): p50 {pct(gw, 50):.2f} ms, p99 {pct(gw, 99):.2f} ms")


def plot(conc: list[dict], raw_tok_s: float, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -r bench/requirements.txt): no plot")
        return
    users = [c["users"] for c in conc]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(users, [c["agg_tok_s"] for c in conc], "o-", label="API aggregate")
    a.axhline(raw_tok_s, color="grey", ls="--", label="raw single stream")
    a.set_xscale("log", base=2)
    a.set_xlabel("concurrent users")
    a.set_ylabel("tokens/s")
    a.legend()
    a.set_title("Throughput")
    b.plot(users, [c["p50_s"] for c in conc], "o-", label="p50")
    b.plot(users, [c["p99_s"] for c in conc], "s-", label="p99")
    b.set_xscale("log", base=2)
    b.set_xlabel("concurrent users")
    b.set_ylabel("request latency (s)")
    b.legend()
    b.set_title("Latency")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="batching", choices=["llama", "batching"])
    ap.add_argument("--quick", action="store_true", help="fewer/shorter runs (smoke test of the script)")
    ap.add_argument("--db", default=None, help="DATABASE_URL for the API (default: a fresh SQLite file)")
    ap.add_argument("--only-overhead", action="store_true", help="run part 3 alone")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    max_tokens = 64 if args.quick else 256
    levels = [1, 2, 4] if args.quick else [1, 2, 4, 8, 16]
    n_overhead = 20 if args.quick else 200
    n_jobs = 40 if args.quick else 500
    db_url = args.db or f"sqlite:///{tempfile.mkdtemp()}/bench.sqlite3"
    results: dict = {"machine": machine_info(), "backend": args.backend, "db": db_url.split(":")[0]}

    print(f"== backend={args.backend} db={results['db']} machine={results['machine']}")
    raw = in_own_process(raw_single_stream, max_tokens)
    results["raw_single"] = raw
    print(f"raw llama-cpp-python single stream: {raw['tok_s']:.1f} tok/s ({raw['completion_tokens']} tokens)")
    engine_lat = in_own_process(engine_alone_latencies, args.backend, n_overhead)

    with Server(args.backend, db_url) as srv:
        if args.only_overhead:
            api_overhead_and_exit(srv, engine_lat, n_overhead)
            return
        api = api_single_stream(srv.url, max_tokens)
        results["api_single"] = api
        print(f"1. API single stream: {api['tok_s']:.1f} tok/s -> {api['tok_s'] / raw['tok_s']:.2f}x raw "
              f"(target >= 0.95x)")
        conc = []
        for users in levels:
            # every request has the single-stream run's shape (same length), and each
            # user sends two in a row, so the level is measured in steady state rather
            # than as one burst dominated by its simultaneous prompt processing
            c = api_concurrency(srv.url, users, per_user=2, max_tokens=max_tokens)
            conc.append(c)
            print(f"2. {users:>2} users: {c['agg_tok_s']:.1f} tok/s aggregate = {c['agg_tok_s'] / raw['tok_s']:.2f}x raw; "
                  f"latency p50 {c['p50_s']:.2f}s p99 {c['p99_s']:.2f}s")
        results["concurrency"] = conc
        api_lat = api_overhead_latencies(srv.url, n_overhead)
        added50 = (pct(api_lat, 50) - pct(engine_lat, 50)) * 1000
        added99 = (pct(api_lat, 99) - pct(engine_lat, 99)) * 1000
        srv.log.flush()
        gw = server_side_overhead_ms(OUT / "server.log")
        results["overhead"] = {"engine_p50_ms": pct(engine_lat, 50) * 1000, "engine_p99_ms": pct(engine_lat, 99) * 1000,
                               "api_p50_ms": pct(api_lat, 50) * 1000, "api_p99_ms": pct(api_lat, 99) * 1000,
                               "added_p50_ms": added50, "added_p99_ms": added99,
                               "server_side_samples": len(gw), "server_side_p50_ms": pct(gw, 50),
                               "server_side_p99_ms": pct(gw, 99)}
        print(f"3. 1-token call: engine alone p50 {pct(engine_lat, 50)*1000:.1f} ms, API p50 {pct(api_lat, 50)*1000:.1f} ms"
              f" -> added p50 {added50:.1f} ms, p99 {added99:.1f} ms (client side, noisy); server-side gateway "
              f"time (latency - model time, {len(gw)} calls): p50 {pct(gw, 50):.2f} ms (target <= 3), "
              f"p99 {pct(gw, 99):.2f} ms (target <= 15)")
        a = api_async(srv.url, n_jobs, 16)
        results["async"] = a
        sync8 = next((c for c in conc if c["users"] == 8), conc[-1])
        print(f"4. async: {a['jobs']} jobs, {a['lost']} lost, states {a['states']}; {a['jobs_s']:.2f} jobs/s, "
              f"{a['tok_s']:.1f} tok/s = {a['tok_s'] / sync8['agg_tok_s']:.2f}x the sync path at {sync8['users']} users")
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    plot(conc, raw["tok_s"], OUT / "concurrency.png")
    print(f"wrote {OUT / 'results.json'} and {OUT / 'concurrency.png'}")


if __name__ == "__main__":
    main()
