"""Throughput of BatchingEngine against raw llama-cpp-python on the same model.

    PYTHONPATH=src python bench/bench_engine.py [--max-tokens 256] [--levels 1,2,4,8,16]

1. raw: one ``llama_cpp.Llama``, ``create_chat_completion`` (temperature 0),
   the same prompt: single-stream tokens/s -- the baseline;
2. BatchingEngine at each concurrency level: that many client threads in a
   closed loop (at least 4 requests per level), aggregate tokens/s and
   p50/p99 request latency, with the ratio to the raw single stream.

The numbers are only as quiet as the machine: on a shared host, run it once
when nothing else is busy and read the ratios rather than absolute values.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import threading
import time

import llama_cpp

from model_api.engine.base import GenerationRequest, SamplingParams
from model_api.engine.batching import BatchingEngine
from model_api.engine.local import default_model_path, default_threads, load_backends

PROMPT = "Write a long story about a dragon who learns to cook."


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    if len(values) == 1:
        return values[0]
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def bench_raw(model_path: str, max_tokens: int, n_threads: int, runs: int) -> float:
    load_backends()
    llm = llama_cpp.Llama(model_path=model_path, n_ctx=2048, n_threads=n_threads,
                          n_batch=512, verbose=False)
    messages = [{"role": "user", "content": PROMPT}]
    llm.create_chat_completion(messages, temperature=0.0, max_tokens=8)  # warm-up
    rates = []
    for _ in range(runs):
        llm.reset()  # no prompt-cache reuse: measure what a fresh request costs
        t0 = time.perf_counter()
        out = llm.create_chat_completion(messages, temperature=0.0, max_tokens=max_tokens)
        dt = time.perf_counter() - t0
        n = out["usage"]["completion_tokens"]
        rates.append(n / dt)
        print(f"  raw run: {n} tokens in {dt:.2f} s = {n / dt:.1f} tok/s")
    llm.close()
    return statistics.median(rates)


def bench_level(engine: BatchingEngine, conc: int, max_tokens: int) -> dict[str, float]:
    total = max(conc, 4)
    req = GenerationRequest.single_prompt(PROMPT, SamplingParams(max_tokens=max_tokens,
                                                                 temperature=0.0))
    latencies: list[float] = []
    tokens = 0
    lock = threading.Lock()
    counter = iter(range(total))

    def client() -> None:
        nonlocal tokens
        while True:
            with lock:
                if next(counter, None) is None:
                    return
            t0 = time.perf_counter()
            res = engine.generate(req)
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                tokens += res.completion_tokens

    threads = [threading.Thread(target=client) for _ in range(conc)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"tok_s": tokens / wall, "p50": percentile(latencies, 0.5),
            "p99": percentile(latencies, 0.99), "requests": total, "tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--levels", default="1,2,4,8,16")
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--raw-runs", type=int, default=3)
    ap.add_argument("--deterministic", action="store_true",
                    help="the engine as MODEL_DETERMINISTIC=1 builds it (flash attention off)")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    path = default_model_path()

    print(f"model {path}\nthreads {args.threads}, max_tokens {args.max_tokens}")
    # In a process of its own: once a llama_cpp.Llama has run in a process, a
    # BatchingEngine in the same process decodes at about half speed (measured:
    # 92 -> 45 tok/s single stream), which would flatter the baseline.
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        raw = pool.apply(bench_raw, (path, args.max_tokens, args.threads, args.raw_runs))
    print(f"raw single stream: {raw:.1f} tok/s\n")

    engine = BatchingEngine(model_path=path, n_threads=args.threads,
                            n_parallel=max(8, max(levels)), n_ctx_per_seq=2048,
                            flash_attn=not args.deterministic)
    try:
        engine.generate(GenerationRequest.single_prompt(PROMPT, SamplingParams(
            max_tokens=8, temperature=0.0)))  # warm-up
        print(f"{'conc':>4} {'reqs':>4} {'tok/s':>8} {'x raw':>6} {'p50 s':>7} {'p99 s':>7}")
        for c in levels:
            r = bench_level(engine, c, args.max_tokens)
            print(f"{c:>4} {r['requests']:>4} {r['tok_s']:>8.1f} {r['tok_s'] / raw:>6.2f} "
                  f"{r['p50']:>7.2f} {r['p99']:>7.2f}", flush=True)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
