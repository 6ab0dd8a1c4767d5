"""Fair scheduling under load: does one user's burst delay another user?

A heavy user keeps 32 requests of 256 tokens in flight (each one re-sent as
soon as it ends); a light user sends 16-token chat requests one after another.
Three runs, each in a process of its own (a second llama.cpp context in one
process decodes at about half speed, see RESULTS.md), on the real model with
the batching engine:

* ``alone``: the light user with the engine to itself;
* ``fifo``: under the heavy load, first come, first served (MODEL_SCHEDULER=fifo);
* ``fair``: under the heavy load, users in turn (MODEL_SCHEDULER=fair, the default).

Reported: the light user's request latency p50 and p99, and the aggregate
generated tokens/s (both users) while the light user ran. Targets (issue 14):
p50 under fair load at most 1.5x alone; fair tokens/s within 5 % of FIFO.

    .venv/bin/python bench/bench_fairness.py [--light-requests 8] [--heavy 32] [--n-parallel 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))
    return ordered[k]


def run(scenario: str, args: argparse.Namespace) -> dict:
    """One scenario in this process; returns its measurements."""
    from model_api.engine.base import GenerationRequest, SamplingParams, Tenant
    from model_api.engine.batching import BatchingEngine

    engine = BatchingEngine(n_parallel=args.n_parallel, n_ctx_per_seq=1024, max_queue=64,
                            scheduler="fifo" if scenario == "fifo" else "fair", n_threads=args.threads)
    heavy_req = GenerationRequest(prompt="1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", tenant=Tenant("heavy"),
                                  params=SamplingParams(max_tokens=args.heavy_tokens, temperature=0))
    light_req = GenerationRequest.chat([{"role": "user", "content": "Say hello."}],
                                       SamplingParams(max_tokens=args.light_tokens, temperature=0))
    light_req = GenerationRequest(messages=light_req.messages, params=light_req.params, tenant=Tenant("light"))
    engine.generate(engine.prepare(light_req))  # warm-up: first-call costs out of the measurement

    tokens = 0
    lock = threading.Lock()
    stop = threading.Event()

    def count(gen) -> None:
        nonlocal tokens
        for _ in gen:
            with lock:
                tokens += 1  # a delta is a token (no stop strings here)

    def heavy_user() -> None:
        while not stop.is_set():
            gen = engine.stream(engine.prepare(heavy_req), stop)
            count(gen)

    threads = []
    if scenario != "alone":
        threads = [threading.Thread(target=heavy_user, daemon=True) for _ in range(args.heavy)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while engine.stats()["waiting"] < args.heavy - args.n_parallel - 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2)  # the load is steady: slots full, queue full
    with lock:
        tokens = 0
    start = time.monotonic()
    latencies, ttft = [], []
    for _ in range(args.light_requests):
        t0 = time.monotonic()
        gen = engine.stream(engine.prepare(light_req))
        count(gen)
        latencies.append(time.monotonic() - t0)
        ttft.append(gen.result.time_to_first_token or 0.0)
    elapsed = time.monotonic() - start
    with lock:
        generated = tokens
    stop.set()
    for t in threads:
        t.join(600)
    engine.close()
    return {"scenario": scenario, "p50": statistics.median(latencies), "p99": _percentile(latencies, 0.99),
            "n": len(latencies), "ttft_p50": statistics.median(ttft), "tokens_per_s": generated / elapsed, "seconds": elapsed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heavy", type=int, default=32, help="heavy user's requests in flight")
    ap.add_argument("--heavy-tokens", type=int, default=256)
    ap.add_argument("--light-tokens", type=int, default=16)
    ap.add_argument("--light-requests", type=int, default=8, help="light user's requests, one after another")
    ap.add_argument("--n-parallel", type=int, default=8, help="MODEL_N_PARALLEL")
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: all cores)")
    ap.add_argument("--scenarios", default="alone,fifo,fair")
    ap.add_argument("--run", help=argparse.SUPPRESS)  # one scenario, in a child process
    args = ap.parse_args()
    if args.run:
        print(json.dumps(run(args.run, args)))
        return
    forwarded = [f"--heavy={args.heavy}", f"--heavy-tokens={args.heavy_tokens}", f"--light-tokens={args.light_tokens}",
                 f"--light-requests={args.light_requests}", f"--n-parallel={args.n_parallel}",
                 *([f"--threads={args.threads}"] if args.threads else [])]
    results = {}
    for scenario in args.scenarios.split(","):
        out = subprocess.run([sys.executable, __file__, *forwarded, "--run", scenario], check=True,
                             capture_output=True, text=True).stdout
        results[scenario] = json.loads(out.strip().splitlines()[-1])
        r = results[scenario]
        print(f"{scenario:>6}: light p50 {r['p50']:.2f} s, p99 {r['p99']:.2f} s (n={r['n']}; first token "
              f"p50 {r['ttft_p50']:.2f} s), "
              f"aggregate {r['tokens_per_s']:.1f} tok/s over {r['seconds']:.0f} s", flush=True)
    print()
    print("| Light user's 16-token requests | p50 | p99 | p50 / alone | aggregate tok/s |")
    print("|---|---|---|---|---|")
    alone = results.get("alone", {}).get("p50")
    for name, label in (("alone", "alone"), ("fifo", "under load, FIFO"), ("fair", "under load, fair")):
        if name in results:
            r = results[name]
            ratio = f"{r['p50'] / alone:.2f}x" if alone else "-"
            print(f"| {label} | {r['p50']:.2f} s | {r['p99']:.2f} s | {ratio} | {r['tokens_per_s']:.1f} |")
    if "fifo" in results and "fair" in results:
        print(f"\nfair / FIFO aggregate tokens/s: {results['fair']['tokens_per_s'] / results['fifo']['tokens_per_s']:.3f}")


if __name__ == "__main__":
    main()
